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
