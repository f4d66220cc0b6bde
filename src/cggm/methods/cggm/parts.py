"""CGGM's smaller parts: the classifiers' metric epsilon, where B acts (Eq. 8), and the classifiers'
evaluation metric.

* **metric** epsilon (higher is better): ``"task"`` (the task's batch metric: accuracy, -MAE, mean
  Dice), ``"sign_accuracy"`` (regression: sign agreement, zero labels counted negative) or
  ``"official"`` (what the official code feeds Eq. 7: sign accuracy on regression, the task's
  metric otherwise; cggm-spec.md A9).
* **where B acts** (``scale_on``): ``"gradient"`` multiplies the gradient flowing into encoder i
  through h_i by B_i during the backward pass (before clipping); ``"update"`` multiplies each
  encoder's optimizer update by B_i (``theta <- theta_old + B_i (theta_new - theta_old)``), the form
  in which B keeps its meaning under Adam, where a gradient factor cancels (A10); ``"auto"`` picks
  ``gradient`` for SGD and ``update`` for adaptive optimizers; an unbounded rule always acts on
  gradients.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torchmetrics import Metric

from ..binding import UnsupportedSettingError
from ..protocol import ProtocolError

METRICS = ("task", "sign_accuracy", "official")
SCALE_ON = ("auto", "gradient", "update")
# optimizers whose update normalises the gradient's scale (B must act on the update there)
ADAPTIVE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
                       torch.optim.RAdam, torch.optim.Adagrad, torch.optim.RMSprop, torch.optim.Adadelta)
PLAIN_OPTIMIZERS = (torch.optim.SGD, torch.optim.ASGD)


class Epsilon:
    """The classifiers' metric epsilon ``[M]`` on a batch (see the module docstring)."""

    def __init__(self, name: str) -> None:
        if name not in METRICS:
            raise ValueError(f"CGGM metric must be one of {METRICS}, got {name!r}.")
        self.name = name
        self.sign = False

    def bind(self, task) -> None:
        if self.name == "sign_accuracy" and not task.signed:
            raise UnsupportedSettingError(f"CGGM metric='sign_accuracy' is for regression, not {task.kind!r}.")
        self.task = task
        self.sign = task.signed and self.name in ("sign_accuracy", "official")

    def one(self, pred: Tensor, target: Tensor) -> Tensor:
        if self.sign:  # the official MOSI signal (A9): sign agreement, label 0 negative
            with torch.no_grad():
                return ((pred.reshape(target.shape) > 0) == (target > 0)).float().mean()
        return self.task.batch_metric(pred, target)

    def __call__(self, preds: list[Tensor], target: Tensor) -> Tensor:
        if self.sign:
            return torch.stack([self.one(pred, target) for pred in preds])
        return self.task.batch_metrics(preds, target)


def where_B_acts(scale_on: str, rule, optimizer) -> str:
    """``"gradient"`` or ``"update"``: ``scale_on`` with ``"auto"`` resolved from the optimizer."""
    if scale_on != "auto":
        return scale_on
    if not rule.bounded:
        return "gradient"
    if optimizer is None:
        raise ProtocolError(
            "CGGM(scale_on='auto') chooses where B acts from the model's optimizer (gradients for SGD, updates "
            "for adaptive optimizers such as Adam): pass it, bind(model, task, ..., optimizer=optimizer), or "
            "choose scale_on='gradient' or 'update'.")
    if isinstance(optimizer, ADAPTIVE_OPTIMIZERS):
        return "update"
    if isinstance(optimizer, PLAIN_OPTIMIZERS):
        return "gradient"
    raise ValueError(
        f"CGGM(scale_on='auto') does not know whether {type(optimizer).__name__} normalises the gradient's "
        f"scale: choose scale_on='gradient' (plain gradient methods) or 'update' (adaptive methods).")


def check_where(scale_on: str, rule) -> None:
    """Refuse B on updates with an unbounded rule (B acts after clipping there)."""
    if scale_on == "update" and not rule.bounded:
        raise ValueError(
            f"CGGM rule {rule.name!r} gives unbounded B (|B| reaches 1e7 when the improvements cancel), and "
            f"scale_on='update' applies B to the optimizer's update after gradient clipping, which then moves a "
            f"weight by up to |B| x lr. The paper's Eq. 8 scales gradients: use scale_on='gradient' (or "
            f"'auto'), or a bounded rule (rule='robust').")


def warn_update_scaling_of_sgd(optimizer) -> None:
    """B on updates with SGD scales momentum and weight decay too, which Eq. 8 does not."""
    if isinstance(optimizer, torch.optim.SGD):
        g = optimizer.param_groups[0]
        if g.get("momentum", 0) or g.get("weight_decay", 0):
            warnings.warn(
                "CGGM(scale_on='update') with SGD scales the whole update, momentum buffer and weight decay "
                "included, which is not Eq. 8 (only the gradient is scaled there); scale_on='gradient' or "
                "'auto' scales the gradient only.", stacklevel=3)


def check_classifiers(classifiers, head_layer, modalities) -> None:
    """One classifier per modality, and Eq. 12 compares the head's last-layer gradient with each one's:
    the same shapes."""
    if len(classifiers) != len(modalities):
        raise ValueError(f"CGGM got {len(classifiers)} classifiers for {len(modalities)} modalities.")
    want = tuple(head_layer.weight.shape)
    for m, clf in zip(modalities, classifiers):
        if tuple(clf.last.weight.shape) != want:
            raise UnsupportedSettingError(
                f"CGGM compares the fused head's last layer (weight {want}) with each classifier's last layer, "
                f"but the classifier of {m!r} has {tuple(clf.last.weight.shape)}. The default classifiers end in "
                f"a Linear or a 1x1 Conv2d: give the head such a last layer, or pass classifiers=... whose `last` "
                f"matches it.")


def scale_updates(groups: list[list[torch.nn.Parameter]], B: Tensor, take_step) -> bool:
    """Take the step, then ``theta <- theta_old + B_i (theta_new - theta_old)`` for modality i's
    parameters: one lerp over every modality's parameters (0-d weights on the device: no sync)."""
    params = [p for ps in groups for p in ps]
    if not params:
        return take_step()
    before = torch._foreach_mul(params, 1.0)  # (a copy, freed after the step)
    taken = take_step()
    if taken:
        keep = (1 - B).unbind()
        weights = []
        for k, ps in zip(keep, groups):
            if ps:
                weights += [k.to(ps[0].dtype)] * len(ps)
        with torch.no_grad():
            torch._foreach_lerp_(params, before, weights)
    return taken


class ClassifierMetric(Metric):
    """Each classifier's metric epsilon on an evaluated split (``clf/<modality>``): a sample-weighted
    mean, summed across DDP ranks by torchmetrics."""

    full_state_update = False

    def __init__(self, cggm) -> None:
        super().__init__()
        self.cggm = cggm
        self.add_state("sums", torch.zeros(len(cggm.modalities) + 1), dist_reduce_fx="sum")

    def update(self, out, target: Tensor) -> None:
        cggm = self.cggm
        if not cggm.auxiliary.has_state:
            return
        clfs = cggm.auxiliary.ensure(out.features)  # (restored for evaluation only: built and loaded now)
        clfs.eval()
        size = cggm.task.target_size(target)
        with torch.no_grad(), torch.autocast(device_type=out.features[0].device.type, enabled=False):
            vals = torch.stack([cggm.epsilon.one(clf(h.to(clf.last.weight.dtype), mask=out.mask(i), size=size), target)
                                for i, (clf, h) in enumerate(zip(clfs, out.features))])
        n = float(target.shape[0])
        self.sums = self.sums + torch.cat([vals * n, torch.full((1,), n, dtype=vals.dtype, device=vals.device)])

    def compute(self) -> dict[str, float]:
        sums = self.sums.cpu()
        if float(sums[-1]) == 0:
            return {}
        return {m: float(v) for m, v in zip(self.cggm.modalities, sums[:-1] / sums[-1])}
