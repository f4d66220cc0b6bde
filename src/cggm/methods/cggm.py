"""Classifier-guided Gradient Modulation (CGGM).

Z. Guo, T. Jin, J. Chen, Z. Zhao. "Classifier-guided Gradient Modulation for Enhanced Multimodal
Learning". NeurIPS 2024, arXiv:2411.01409. Equations refer to the paper; defects of the official
code (github zrguo/CGGM) are referenced as cggm-spec.md A1-A13.

CGGM is composed of parts, each chosen at construction, and the combinations that would not do
what their names say are refused in one place (:meth:`CGGM._check_composition`):

* **classifiers** (Eq. 5): each auxiliary classifier f_i sees ``h_i.detach()`` (fp32, outside
  autocast), so its loss never reaches the encoders; they are trained by their own optimizer and
  unused at inference. Their loss is a second root of the model's backward pass
  (:meth:`CGGM.compute_gradients`): one pass instead of two, with gradients identical to a pass of
  their own (unscaled by a GradScaler, which scales only the model's loss).
* **metric** epsilon (higher is better): ``"task"`` (the task's batch metric: accuracy, -MAE, mean
  Dice), ``"sign_accuracy"`` (regression: sign agreement, zero labels counted negative) or
  ``"official"`` (what the official code feeds Eq. 7: sign accuracy on regression, the task's
  metric otherwise).
* **rule** (Eq. 6-7): :class:`~cggm.methods.improvement.PaperRule` (raw Eq. 7, unbounded) or
  :class:`~cggm.methods.improvement.RobustRule` (ours, ``0 <= B <= rho``).
* **where B acts** (Eq. 8, ``scale_on``): ``"gradient"`` multiplies the gradient flowing into
  encoder i through h_i by B_i during the backward pass (a hook per feature, so every parameter
  of that encoder, input projections included, gets exactly B_i times its gradient; nothing
  matches parameter names; clipping and finite checks come after). ``"update"`` multiplies each
  encoder's optimizer update by B_i (``theta <- theta_old + B_i (theta_new - theta_old)``): under
  Adam a gradient factor cancels in m / sqrt(v), so this is the form in which B keeps its meaning
  for adaptive optimizers (cggm-spec.md A10). ``"auto"`` (default) picks ``gradient`` for SGD
  (Eq. 8 exactly: momentum and weight decay are not scaled) and ``update`` for adaptive
  optimizers (Adam, AdamW, ...); an unbounded rule always acts on gradients, before clipping:
  B applied to an update after clipping moves weights by up to |B| x lr (|B| reaches 1e7).
* **direction** (Eq. 9-13): :class:`GradientCosine` (the paper): g_F = dL_task/dW_F for the fused
  head's last layer W_F, taken with ``create_graph=True``, and g_i = dL_i/dW_{f_i} for classifier
  i's last layer (a constant),

      L_gm = (1/M) sum_i ( |B_i| - B_i cos(g_F, g_i) )                     (Eq. 12)
      L    = L_task + lambda L_gm                                           (Eq. 13)

  back-propagated once, in the same step, so L_gm's gradient reaches the head and, through g_F,
  the fusion and encoders. :class:`WeightCosine` reproduces the official code instead (A1, A2):
  the cosine of the *weights* W_F and W_{f_i}, built at step t and added at step t+1, so its
  gradient lands only on W_F, evaluated at step t's values, with B without rho. ``"off"``: none.

When each part moves (see :mod:`cggm.methods.base`): :meth:`loss` measures the classifiers'
metrics (and, for the gradient direction term, their last layers' gradients) and proposes B
without changing any state; :meth:`backward` fills the classifiers' gradients; the classifiers' optimizer
step, the rule's history and the official term's stale weights advance in :meth:`commit`, once per
optimizer step taken (under gradient accumulation, with the micro-batches' mean metric and mean
classifier gradient); a skipped step changes nothing.

Records per step: ``B/<modality>``, ``eps/<modality>``, ``cos/<modality>`` and ``L_gm``; at
evaluation, ``clf/<modality>`` (each classifier's metric on the evaluated split).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import distributed
from ..models.base import head_layer_hidden
from ..models.classifiers import build_classifier
from ..types import ModelOutput
from .base import Method, ProtocolError, Support, UnsupportedSettingError, no_autocast
from .improvement import ImprovementRule, build_rule
from .registry import register_method

ScaleOn = Literal["auto", "gradient", "update"]
METRICS = ("task", "sign_accuracy", "official")

# optimizers whose update normalises the gradient's scale (B must act on the update there)
ADAPTIVE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
                       torch.optim.RAdam, torch.optim.Adagrad, torch.optim.RMSprop, torch.optim.Adadelta)
PLAIN_OPTIMIZERS = (torch.optim.SGD, torch.optim.ASGD)


# -- direction terms -------------------------------------------------------------------------------
class DirectionTerm:
    """A direction term of CGGM (Eq. 12-13): ``loss(...)`` gives L_gm for this step (or None);
    ``commit``/``discard`` keep state that must move only when a step is taken.
    ``clf_loss`` is the sum of the classifiers' losses of this step (its graph starts at the
    detached features, so it reaches only the classifiers)."""

    name = "off"

    def loss(self, cggm: CGGM, task_loss: Tensor, B: Tensor, clf_loss: Tensor) -> tuple[Tensor, Tensor] | None:
        raise NotImplementedError

    def commit(self) -> None:
        pass

    def discard(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class GradientCosine(DirectionTerm):
    """Eq. 12 on gradients, in the same step (the paper): cos(dL_task/dW_F, dL_i/dW_fi).

    Under fp16 (autocast to float16, or a float16 head) g_F is taken as ``grad(task_loss, W_F,
    grad_outputs=k) / k`` with ``k`` a power of two that brings |k g_F| to about 2^8: see
    :func:`_fp16_seed`. ``rescale``: ``None`` (default) does this under fp16 only; ``True``
    always, ``False`` never. Scaling by a power of two is exact in floating point, so the value of
    g_F and the gradient of L_gm are those of Eq. 12 either way.
    """

    name = "gradient"

    def __init__(self, rescale: bool | None = None) -> None:
        self.rescale = rescale

    def loss(self, cggm, task_loss, B, clf_loss):
        W_F = cggm.head_layer.weight
        last = [clf.last.weight for clf in cggm.classifiers]
        # g_F with its graph (so L_gm reaches the head, the fusion and the encoders) and each
        # classifier's g_i as a constant: two calls, since a graph of the g_i (create_graph in a
        # single call) costs more than the second call (measured on the MLP model: 262 us for one
        # call against 96 + 126 us for two)
        rescale = self.rescale if self.rescale is not None else _fp16_graph(W_F)
        seed = _fp16_seed(task_loss, W_F) if rescale else None
        (g_F,) = torch.autograd.grad(task_loss, W_F, grad_outputs=seed, create_graph=True, retain_graph=True,
                                     allow_unused=True)
        if g_F is not None and seed is not None:
            g_F = g_F / seed  # (exact: a power of two), in fp32, after the fp16 part of g_F's graph
        if g_F is None:
            raise UnsupportedSettingError(
                "CGGM's direction term needs the gradient of the task loss with respect to the fused head's last "
                "layer, but the loss does not depend on it: pass head_layer=... (the layer that produces the "
                "prediction), or direction='off'.")
        grads = torch.autograd.grad(clf_loss, last, retain_graph=True, allow_unused=True)
        g_i = [torch.zeros_like(w) if g is None else g for w, g in zip(last, grads)]
        # under DDP: the global batch's g_F (differentiable) and g_i on every rank (identity in one process)
        g_F = distributed.mean_over_ranks(g_F)
        if distributed.is_distributed():
            g_i = _mean_over_ranks(g_i)
        G = torch.stack([g.reshape(-1) for g in g_i]).to(g_F.dtype)
        cos = F.cosine_similarity(g_F.reshape(1, -1), G, dim=1)
        return gradient_modulation_loss(B.to(cos.dtype), cos), cos


def _fp16_graph(W_F: Tensor) -> bool:
    """Whether g_F's graph runs in float16: autocast to float16 on W_F's device, or a float16 head."""
    device_type = W_F.device.type
    try:
        autocast_fp16 = (torch.is_autocast_enabled(device_type)
                         and torch.get_autocast_dtype(device_type) == torch.float16)
    except RuntimeError:  # a device type autocast does not know
        autocast_fp16 = False
    return autocast_fp16 or W_F.dtype == torch.float16


_FP16_SEED_LOG2 = 8.0  # |k g_F| ~ 2^8: 2^8 below fp16's range forward, the backward 2^8 smaller


def _fp16_seed(task_loss: Tensor, W_F: Tensor) -> Tensor | None:
    """The seed ``k`` (a power of two, 0-d, on the device: no sync) of the differentiable g_F under fp16.

    Why: the gradient of L_gm with respect to g_F is ``lam B (g_i/|g_i| - cos g_F/|g_F|) / (M |g_F|)``,
    times the GradScaler's scale S. In the double backward it meets the fp16 matmul that made g_F
    from the head's input h and the fp16 gradient at the head's output (dL/dz): the gradient of
    dL/dz, ``h @ dL_gm/dg_F``, is about ``S lam |B| |h| / (M |g_F|)`` and overflows fp16 as the
    model fits (|g_F| -> 0): measured on the synthetic MLP, it is the first tensor to turn inf, with
    |g_F| = 0.3 and S = 65536 already (benchmarks/fp16_scale.py). With the seed k, that fp16 part
    of the graph computes k g_F forward and receives dL_gm/dg_F / k backward, and ``g_F = grad / k``
    puts the k back in fp32; the k multiplies back in at the task loss's backward, which autocast
    runs in fp32. So the fp16 tensors see |k g_F| ~ 2^8 forward and ~ S lam |B| |h| / (2^8 M)
    backward, whatever |g_F| is (with |k g_F| ~ 1 the backward still overflowed, S = 65536).

    k comes from a first, graph-free gradient of the head's last layer (a backward through the loss
    and that layer only), rounded to a power of two (exact scaling) and bounded to 2^[-64, 64]."""
    (g,) = torch.autograd.grad(task_loss, W_F, retain_graph=True, allow_unused=True)
    if g is None:
        return None
    norm = g.detach().float().norm()
    exponent = torch.round(_FP16_SEED_LOG2 - torch.log2(norm.clamp_min(2.0**-64))).clamp(-64.0, 64.0)
    return torch.exp2(exponent).to(task_loss.dtype).reshape(task_loss.shape)


class WeightCosine(DirectionTerm):
    """The official code's L_gm (cggm-spec.md A1, A2): cosines of the head's and classifiers'
    last-layer *weights* from step t-1, added at step t, with B / rho; moves only W_F."""

    name = "weight"

    def __init__(self) -> None:
        self.stale: tuple[Tensor, list[Tensor], Tensor] | None = None  # W_F, W_fi, B / rho of the last step
        self._staged: tuple[Tensor, list[Tensor], Tensor] | None = None

    def loss(self, cggm, task_loss, B, clf_loss):
        W_F = cggm.head_layer.weight
        result = None
        if self.stale is not None:
            stale_head, stale_clf, b = self.stale
            # the value of the stale weights, the gradient flowing to the live parameter W_F
            head = W_F + (stale_head.to(W_F.device) - W_F.detach())
            cos = torch.stack([F.cosine_similarity(head.flatten(), w.flatten().to(head.dtype), dim=0)
                               for w in stale_clf])
            result = gradient_modulation_loss(b.to(cos.dtype), cos), cos
        # this step's weights (the classifiers before their update), used at the next step
        self._staged = (W_F.detach().clone(), [clf.last.weight.detach().clone() for clf in cggm.classifiers],
                        (B / cggm.rho).detach())
        return result

    def commit(self) -> None:
        if self._staged is not None:
            self.stale, self._staged = self._staged, None

    def discard(self) -> None:
        self._staged = None

    def state_dict(self):
        return {"stale": self.stale}

    def load_state_dict(self, state):
        self.stale = state.get("stale")


DIRECTIONS = {"gradient": GradientCosine, "weight": WeightCosine}


@register_method("cggm")
class CGGM(Method):
    """CGGM: classifier-guided magnitude (Eq. 7-8) and direction (Eq. 12-13) modulation.

    Args:
        rho: the scaling hyper-parameter of Eq. 7 (> 0).
        lam: lambda of Eq. 13 (>= 0).
        magnitude: apply B to the encoders (Eq. 8).
        direction: ``"gradient"`` (paper, default), ``"weight"`` (official code), ``"off"``, or a
            :class:`DirectionTerm`.
        rule: ``"robust"`` (default, ours), ``"paper"`` (raw Eq. 7), or an ``ImprovementRule``.
        scale_on: ``"auto"`` (default: gradient for SGD, update for adaptive optimizers),
            ``"gradient"`` (Eq. 8 literally) or ``"update"``. See the module docstring.
        metric: the classifiers' metric epsilon: ``"task"``, ``"sign_accuracy"`` or ``"official"``.
        rule_options: keyword options of a rule given by name (``beta``, ``window``, ``tau`` for robust).
        classifier_lr, classifier_optimizer, classifier_weight_decay, classifier_momentum: the
            classifiers' own optimizer (``adam``, ``adamw`` or ``sgd``).
        classifier_layers: self-attention layers of the default sequence classifier (1-2).
        classifiers: optional user classifiers, one per modality, each with a ``last`` layer
            shaped like ``head_layer``; called as ``clf(h, mask=None, size=None)``.
        head_layer: the fused head's last layer; defaults to ``model.head_layer``.
        modality_parameters: each modality's encoder parameters (for ``update`` scaling when the
            model does not declare ``modality_parameters()``); also accepted by :meth:`bind`.
    """

    name = "cggm"
    accumulates_gradients = True  # the classifiers' gradients add up over micro-batches like the model's
    support = Support(needs="per-modality features and a fused head whose last layer is Linear or ConvNd")

    def __init__(
        self,
        rho: float = 1.3,
        lam: float = 0.2,
        magnitude: bool = True,
        direction: str | DirectionTerm = "gradient",
        rule: str | ImprovementRule = "robust",
        scale_on: ScaleOn = "auto",
        metric: str = "task",
        rule_options: Mapping[str, Any] | None = None,
        classifier_lr: float = 5e-4,
        classifier_optimizer: str = "adam",
        classifier_weight_decay: float = 0.0,
        classifier_momentum: float = 0.9,
        classifier_layers: int = 1,
        classifiers: Sequence[nn.Module] | None = None,
        head_layer: nn.Module | None = None,
        modality_parameters: Sequence[Any] | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not (rho > 0 and rho < float("inf")):
            raise ValueError(f"CGGM rho must be a finite number > 0, got {rho}.")
        if not (lam >= 0 and lam < float("inf")):
            raise ValueError(f"CGGM lam (lambda) must be a finite number >= 0, got {lam}.")
        if classifier_optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"classifier_optimizer must be 'adam', 'adamw' or 'sgd', got {classifier_optimizer!r}.")
        if not classifier_lr > 0:
            raise ValueError(f"classifier_lr must be > 0, got {classifier_lr}.")
        if classifier_weight_decay < 0:
            raise ValueError(f"classifier_weight_decay must be >= 0, got {classifier_weight_decay}.")
        self.rho, self.lam = float(rho), float(lam)
        self.magnitude = bool(magnitude)
        self.rule = rule if isinstance(rule, ImprovementRule) else build_rule(rule, self.rho, **dict(rule_options or {}))
        if isinstance(rule, ImprovementRule) and rule_options:
            raise ValueError("rule_options apply to a rule given by name; configure the ImprovementRule object instead.")
        if isinstance(direction, DirectionTerm):
            self.direction_term: DirectionTerm | None = direction
        elif direction == "off":
            self.direction_term = None
        elif direction in DIRECTIONS:
            self.direction_term = DIRECTIONS[direction]()
        else:
            raise ValueError(f"CGGM direction must be 'gradient', 'weight' or 'off', got {direction!r}.")
        self.scale_on, self.metric = scale_on, metric
        self.classifier_lr = float(classifier_lr)
        self.classifier_optimizer_name = classifier_optimizer
        self.classifier_weight_decay = float(classifier_weight_decay)
        self.classifier_momentum = float(classifier_momentum)
        self.classifier_layers = int(classifier_layers)
        self.classifiers: nn.ModuleList | None = nn.ModuleList(classifiers) if classifiers is not None else None
        self.classifier_opt: torch.optim.Optimizer | None = None
        self._head_layer = head_layer
        self._given_params = modality_parameters
        self._pending_state: Mapping[str, Any] | None = None
        self._staged: list[Tensor] = []  # the classifiers' metric epsilon [M] of each micro-batch
        self._clf_loss: Tensor | None = None  # the classifiers' loss, back-propagated with the model's
        self._step_proposal: tuple[Tensor, dict[str, Any]] | None = None
        self._eval_sums: Tensor | None = None
        self._check_composition()

    @property
    def direction(self) -> str:
        return "off" if self.direction_term is None else self.direction_term.name

    @classmethod
    def official(cls, rho: float = 1.3, lam: float = 0.2, **kwargs: Any) -> CGGM:
        """The official code's behaviour (for comparison with published runs), composed of: raw
        Eq. 7 on consecutive batches in the published code's form (``rule="paper"`` with
        ``rule_options={"formula": "official"}``: the 1e-8 guard added to the numerator too, so B
        is rho for every encoder when no metric changes), the official metric (batch sign accuracy
        on regression, A9), encoder gradients scaled by B before clipping (``scale_on="gradient"``)
        and the one-step-late cosine of weights (``direction="weight"``) (cggm-spec.md A1-A3, A9).
        Its global gradient clipping (0.8) is a training setting (``clip_grad_norm``), set in the
        paper presets."""
        kwargs.setdefault("scale_on", "gradient")
        kwargs.setdefault("metric", "official")
        kwargs.setdefault("rule", "paper")
        kwargs.setdefault("direction", "weight")
        if kwargs["rule"] == "paper":  # (a rule given by name: the published formula unless told otherwise)
            kwargs["rule_options"] = {"formula": "official", **dict(kwargs.get("rule_options") or {})}
        return cls(rho=rho, lam=lam, **kwargs)

    # -- composition ---------------------------------------------------------------------------
    def _check_composition(self) -> None:
        """Every refused combination of parts, in one place."""
        if self.scale_on not in ("auto", "gradient", "update"):
            raise ValueError(f"CGGM scale_on must be 'auto', 'gradient' or 'update', got {self.scale_on!r}.")
        if self.metric not in METRICS:
            raise ValueError(f"CGGM metric must be one of {METRICS}, got {self.metric!r}.")
        if self.magnitude and self.scale_on == "update" and not self.rule.bounded:
            raise ValueError(
                f"CGGM rule {self.rule.name!r} gives unbounded B (|B| reaches 1e7 when the improvements cancel), and "
                f"scale_on='update' applies B to the optimizer's update after gradient clipping, which then moves a "
                f"weight by up to |B| x lr. The paper's Eq. 8 scales gradients: use scale_on='gradient' (or "
                f"'auto'), or a bounded rule (rule='robust').")
        if self.task is not None:
            if self.metric == "sign_accuracy" and self.task.kind != "regression":
                raise UnsupportedSettingError(f"CGGM metric='sign_accuracy' is for regression, not {self.task.kind!r}.")

    def where_B_acts(self) -> str:
        """``"gradient"`` or ``"update"``: ``scale_on`` with ``"auto"`` resolved from the optimizer."""
        if self.scale_on != "auto":
            return self.scale_on
        if not self.rule.bounded:
            return "gradient"
        if self.optimizer is None:
            raise ProtocolError(
                "CGGM(scale_on='auto') chooses where B acts from the model's optimizer (gradients for SGD, updates "
                "for adaptive optimizers such as Adam): pass it, bind(model, task, ..., optimizer=optimizer), or "
                "choose scale_on='gradient' or 'update'.")
        if isinstance(self.optimizer, ADAPTIVE_OPTIMIZERS):
            return "update"
        if isinstance(self.optimizer, PLAIN_OPTIMIZERS):
            return "gradient"
        raise ValueError(
            f"CGGM(scale_on='auto') does not know whether {type(self.optimizer).__name__} normalises the gradient's "
            f"scale: choose scale_on='gradient' (plain gradient methods) or 'update' (adaptive methods).")

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        super().set_optimizer(optimizer)
        if self.magnitude and self.scale_on == "update" and isinstance(optimizer, torch.optim.SGD):
            g = optimizer.param_groups[0]
            if g.get("momentum", 0) or g.get("weight_decay", 0):
                warnings.warn(
                    "CGGM(scale_on='update') with SGD scales the whole update, momentum buffer and weight decay "
                    "included, which is not Eq. 8 (only the gradient is scaled there); scale_on='gradient' or "
                    "'auto' scales the gradient only.", stacklevel=2)

    # -- set-up ---------------------------------------------------------------------------------
    def bind(self, model, task, modalities=None, *, modality_parameters=None, optimizer=None):
        if modality_parameters is None:
            modality_parameters = self._given_params
        return super().bind(model, task, modalities, modality_parameters=modality_parameters, optimizer=optimizer)

    def setup(self) -> None:
        self._check_composition()
        self._sign_accuracy = self.task.kind == "regression" and self.metric in ("sign_accuracy", "official")
        try:  # the head's last layer is compared with the classifiers': refuse now if there is none
            head_layer_hidden(self.head_layer)
        except TypeError as err:
            raise UnsupportedSettingError(str(err)) from err
        if self.magnitude and self.scale_on == "update":
            self.modality_parameter_groups()  # raises now if they cannot be found or overlap
        if self.classifiers is not None:
            if len(self.classifiers) != len(self.modalities):
                raise ValueError(f"CGGM got {len(self.classifiers)} classifiers for {len(self.modalities)} modalities.")
            self._check_classifier_shapes()
            self._make_optimizer()

    @property
    def head_layer(self) -> nn.Module:
        if self._head_layer is not None:
            return self._head_layer
        layer = getattr(self.model, "head_layer", None)
        if layer is None:
            raise UnsupportedSettingError(
                "CGGM needs the fused head's last layer: pass head_layer=... or give the model a head_layer.")
        return layer

    def _build_classifiers(self, out: ModelOutput) -> None:
        hidden = head_layer_hidden(self.head_layer)
        # drawn from the global RNG, which is then put back: building them when a resumed run
        # loads their saved weights must not shift the random stream (dropout, ...) of the steps
        device = out.features[0].device
        # (normal tensors even when first built under inference mode, e.g. an evaluation-only restore)
        with torch.inference_mode(False), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.classifiers = nn.ModuleList(
                build_classifier(h.detach(), hidden, self.task.num_outputs, self.classifier_layers)
                for h in out.features
            )
        self._check_classifier_shapes()
        with torch.inference_mode(False):
            self._make_optimizer()

    def _check_classifier_shapes(self) -> None:
        """Eq. 12 compares the head's last-layer gradient with each classifier's: same shapes."""
        want = tuple(self.head_layer.weight.shape)
        for m, clf in zip(self.modalities, self.classifiers):
            have = tuple(clf.last.weight.shape)
            if have != want:
                raise UnsupportedSettingError(
                    f"CGGM compares the fused head's last layer (weight {want}) with each classifier's last layer, "
                    f"but the classifier of {m!r} has {have}. The default classifiers end in a Linear or a 1x1 "
                    f"Conv2d: give the head such a last layer, or pass classifiers=... whose `last` matches it."
                )

    def _make_optimizer(self) -> None:
        self._clf_params = list(self.classifiers.parameters())
        params = self._clf_params
        wd = self.classifier_weight_decay
        if self.classifier_optimizer_name == "sgd":
            cls, kwargs = torch.optim.SGD, {"lr": self.classifier_lr, "momentum": self.classifier_momentum,
                                            "weight_decay": wd}
        else:
            cls = torch.optim.AdamW if self.classifier_optimizer_name == "adamw" else torch.optim.Adam
            kwargs = {"lr": self.classifier_lr, "weight_decay": wd}
        # one fused kernel over all classifiers where the device supports it (CUDA, CPU), else
        # foreach (one kernel per op; also on CPU, where it is not torch's default)
        try:
            self.classifier_opt = cls(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            self.classifier_opt = cls(params, foreach=True, **kwargs)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._load_modules(state)

    def modules(self) -> Mapping[str, nn.Module]:
        return {} if self.classifiers is None else {"classifiers": self.classifiers}

    # -- the step -------------------------------------------------------------------------------
    def _metric(self, pred: Tensor, target: Tensor) -> Tensor:
        if self._sign_accuracy:  # the official MOSI signal (A9): sign agreement, label 0 negative
            with torch.no_grad():
                return ((pred.reshape(target.shape) > 0) == (target > 0)).float().mean()
        return self.task.batch_metric(pred, target)

    def _metrics(self, preds: list[Tensor], target: Tensor) -> Tensor:
        """epsilon ``[M]`` of the classifiers' predictions."""
        if self._sign_accuracy:
            return torch.stack([self._metric(pred, target) for pred in preds])
        return self.task.batch_metrics(preds, target)

    def _classify(self, out: ModelOutput, target: Tensor) -> tuple[Tensor, Tensor]:
        """Each classifier on its detached features, in fp32 outside autocast: epsilon ``[M]``
        (averaged over DDP ranks) and the sum of the classifiers' losses. Nothing is stepped."""
        size = tuple(target.shape[-2:]) if self.task.kind == "segmentation" else None
        if not self.classifiers.training:
            self.classifiers.train()
        device_type = out.features[0].device.type
        with no_autocast(device_type):
            losses, preds = [], []
            for i, (clf, h) in enumerate(zip(self.classifiers, out.features)):
                pred = clf(h.detach().to(clf.last.weight.dtype), mask=out.mask(i), size=size)
                losses.append(self.task.loss(pred, target))
                preds.append(pred)
        total = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        return distributed.weighted_mean(self._metrics(preds, target), target.shape[0]), total

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        if self.classifiers is None:
            self._build_classifiers(out)  # (also loads the saved ones on the first step after a resume)
        where = self.where_B_acts() if self.magnitude else None
        eps, clf_loss = self._classify(out, target)
        proposal = self.rule.propose(eps)  # B [M], Eq. 7 (or another rule), and the rule's next state
        B = proposal[0]
        # the classifiers' gradients come from the same backward pass as the model's (see
        # compute_gradients): their loss is a second root of it, so it needs no pass of its own
        self._staged.append(eps)
        self._clf_loss = clf_loss if self._clf_loss is None else self._clf_loss + clf_loss
        # with one micro-batch this is the step's proposal (accepted in commit); with several,
        # the step's is recomputed from their mean metric
        self._step_proposal = proposal if len(self._staged) == 1 else None
        for i, m in enumerate(self.modalities):
            self.record(f"B/{m}", B[i])
            self.record(f"eps/{m}", eps[i])
        if where == "gradient":
            self.scale_feature_gradients(out, B)
        if self.direction_term is None:
            return task_loss
        term = self.direction_term.loss(self, task_loss, B, clf_loss)
        if term is None:
            return task_loss
        l_gm, cos = term
        for i, m in enumerate(self.modalities):
            self.record(f"cos/{m}", cos[i])
        self.record("L_gm", l_gm)
        return task_loss + self.lam * l_gm

    def compute_gradients(self, loss: Tensor) -> None:
        """One backward pass with two roots: the loss (its gradients reach the model, B through the
        feature hooks) and the classifiers' loss (whose graph starts at detached features, so its
        gradients reach the classifiers only, unscaled by any GradScaler that scaled ``loss``)."""
        clf_loss, self._clf_loss = self._clf_loss, None
        if clf_loss is None or not clf_loss.requires_grad:  # (e.g. user classifiers that are all frozen)
            loss.backward()
        else:
            torch.autograd.backward([loss, clf_loss])

    def _proposal(self) -> tuple[Tensor, dict[str, Any]]:
        """B and the rule's next state for the step being taken (the micro-batches' mean metric)."""
        if self._step_proposal is None:
            eps = torch.stack(self._staged).mean(0)
            self._step_proposal = self.rule.propose(eps)
        return self._step_proposal

    def update(self, take_step) -> bool:
        if not (self.magnitude and self.where_B_acts() == "update"):
            return take_step()
        B = self._proposal()[0]
        groups = self.modality_parameter_groups()
        params = [p for ps in groups for p in ps]
        if not params:
            return take_step()
        before = torch._foreach_mul(params, 1.0)  # (a copy, freed after the step)
        taken = take_step()
        if taken:
            # theta <- theta_old + B_i (theta_new - theta_old), i.e. lerp(theta_new, theta_old, 1 - B_i),
            # in one call over every modality's parameters (0-d weights on the device: no sync)
            keep = (1 - B).unbind()
            weights = []
            for k, ps in zip(keep, groups):
                if ps:
                    weights += [k.to(ps[0].dtype)] * len(ps)
            with torch.no_grad():
                torch._foreach_lerp_(params, before, weights)
        return taken

    def commit(self, scaler=None) -> None:
        """The step was taken: the classifiers step on the micro-batches' mean gradient, the rule
        accepts the step's mean metric, and the direction term keeps this step's weights."""
        _, next_state = self._proposal()
        n = len(self._staged)
        grads = [p.grad for p in self._clf_params if p.grad is not None]
        if grads:
            if n > 1:
                torch._foreach_div_(grads, float(n))
            distributed.average_gradients(self._clf_params)  # (one collective; nothing in one process)
            self.classifier_opt.step()
            for p in self._clf_params:
                p.grad = None
        self.rule.accept(next_state)
        if self.direction_term is not None:
            self.direction_term.commit()
        self._staged, self._step_proposal, self._clf_loss = [], None, None

    def discard(self) -> None:
        if self.direction_term is not None:
            self.direction_term.discard()
        if self.classifier_opt is not None:
            for p in self._clf_params:
                p.grad = None
        self._staged, self._step_proposal, self._clf_loss = [], None, None

    # -- evaluation -----------------------------------------------------------------------------
    def eval_begin(self) -> None:
        self._eval_sums = None

    def eval_step(self, out: ModelOutput, target: Tensor) -> None:
        if self.classifiers is None and self._pending_state is not None:
            self._build_classifiers(out)  # restored for evaluation only: build them and load their weights
        if self.classifiers is None:
            return
        size = tuple(target.shape[-2:]) if self.task.kind == "segmentation" else None
        self.classifiers.eval()
        with torch.no_grad(), torch.autocast(device_type=out.features[0].device.type, enabled=False):
            vals = torch.stack([
                self._metric(clf(h.to(clf.last.weight.dtype), mask=out.mask(i), size=size), target)
                for i, (clf, h) in enumerate(zip(self.classifiers, out.features))
            ])
        n = float(target.shape[0])
        row = torch.cat([vals * n, torch.full((1,), n, dtype=vals.dtype, device=vals.device)])
        self._eval_sums = row if self._eval_sums is None else self._eval_sums + row

    def eval_end(self) -> dict[str, float]:
        sums = self._eval_sums
        if sums is None:
            if self.classifiers is None or not distributed.is_distributed():
                return {}
            # an empty evaluation shard on this rank: still take part in the all-reduce
            p = next(self.classifiers.parameters())
            sums = torch.zeros(len(self.modalities) + 1, device=p.device)
        sums = distributed.all_reduce_sum(sums).cpu()
        if float(sums[-1]) == 0:
            return {}
        means = sums[:-1] / sums[-1]
        return {f"clf/{m}": float(v) for m, v in zip(self.modalities, means)}

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["rule"] = self.rule.state_dict()
        if self.direction_term is not None:
            state["direction"] = self.direction_term.state_dict()
        if self.classifiers is not None:
            state["classifiers"] = self.classifiers.state_dict()
            state["classifier_opt"] = self.classifier_opt.state_dict()
        elif self._pending_state is not None:
            state["classifiers"] = self._pending_state["classifiers"]
            state["classifier_opt"] = self._pending_state["classifier_opt"]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.rule.load_state_dict(state.get("rule", {}))
        if self.direction_term is not None:
            self.direction_term.load_state_dict(state.get("direction", {}))
        if "classifiers" in state:
            if self.classifiers is None:
                self._pending_state = state  # applied when the classifiers are built on the first batch
            else:
                self._load_modules(state)

    def _load_modules(self, state: Mapping[str, Any]) -> None:
        self.classifiers.load_state_dict(state["classifiers"])
        self.classifier_opt.load_state_dict(state["classifier_opt"])


def gradient_modulation_loss(B: Tensor, cos: Tensor) -> Tensor:
    """Eq. 12: ``(1/M) sum_i (|B_i| - B_i cos_i)``; B is a constant here."""
    B = B.detach()
    return (B.abs() - B * cos).mean()


def _mean_over_ranks(grads: list[Tensor | None]) -> list[Tensor | None]:
    """The mean over DDP ranks of a list of gradients, in one flat collective."""
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    flat = distributed.all_reduce_sum(torch.cat([g.reshape(-1) for g in present])) / distributed.world_size()
    out, offset = [], 0
    for g in grads:
        if g is None:
            out.append(None)
            continue
        out.append(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()
    return out
