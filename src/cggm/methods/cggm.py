"""Classifier-guided Gradient Modulation (CGGM).

Z. Guo, T. Jin, J. Chen, Z. Zhao. "Classifier-guided Gradient Modulation for Enhanced Multimodal
Learning". NeurIPS 2024, arXiv:2411.01409. Equations refer to the paper; defects of the official
code (github zrguo/CGGM) are referenced as cggm-spec.md A1-A13.

What one training step does, for M modalities with features h_1..h_M:

1. Classifiers (Eq. 5). Each auxiliary classifier f_i sees ``h_i.detach()``, so its loss never
   reaches the encoders. Its metric epsilon_i on the batch (higher is better, see
   :meth:`cggm.types.Task.batch_metric`) is measured *before* its own optimizer steps, then it is
   trained on its own loss by its own optimizer. At inference the classifiers are not used.
2. Magnitude (Eq. 6-8). An improvement rule (``rule="paper"``: raw Eq. 7; ``rule="robust"``: see
   :mod:`cggm.methods.improvement`) turns the epsilons into factors B_i. With
   ``magnitude=True`` each encoder's gradient is multiplied by B_i:

   * ``scale_on="gradient"`` (Eq. 8, the SGD view): a hook on h_i multiplies the gradient that
     flows into encoder i by B_i, so every parameter of that encoder (input projections included)
     gets exactly B_i times its unmodulated gradient. Nothing matches parameter names.
   * ``scale_on="update"``: the optimizer steps as usual, then each encoder's parameter *update*
     is multiplied by B_i (theta <- theta_old + B_i (theta_new - theta_old)). Under Adam a
     constant gradient factor cancels in m / sqrt(v), so this is the form in which B keeps its
     meaning for adaptive optimizers (cggm-spec.md A10). Needs ``model.modality_parameters()``.

   The fusion module and head are never scaled.
3. Direction (Eq. 9-13). With ``direction="gradient"`` (default, the paper):
   g_F = dL_task/dW_F for the fused head's last layer W_F, taken with ``create_graph=True``, and
   g_i = dL_i/dW_{f_i} for classifier i's last layer (a constant target),

       L_gm = (1/M) sum_i ( |B_i| - B_i cos(g_F, g_i) )                     (Eq. 12)
       L    = L_task + lambda L_gm                                           (Eq. 13)

   is back-propagated once, in the same step, so L_gm's gradient reaches the head and, through
   g_F, the fusion and encoders. ``direction="weight"`` reproduces the official code instead
   (A1, A2): the cosine of the *weights* W_F and W_{f_i}, built at step t and added at step t+1,
   so its gradient lands only on W_F, evaluated at step t's values; the B inside it omits rho, as
   in the official code. ``direction="off"`` disables the term.

Records per step: ``B/<modality>``, ``eps/<modality>``, ``cos/<modality>`` and ``L_gm``; at
evaluation, ``clf/<modality>`` (each classifier's metric on the evaluated split).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import distributed
from ..models.base import head_layer_hidden
from ..models.classifiers import build_classifier
from ..types import ModelOutput
from .base import Method, Support
from .improvement import build_rule
from .registry import register_method

Direction = Literal["gradient", "weight", "off"]
ScaleOn = Literal["gradient", "update"]


@register_method("cggm")
class CGGM(Method):
    """CGGM: classifier-guided magnitude (Eq. 7-8) and direction (Eq. 12-13) modulation.

    Args:
        rho: the scaling hyper-parameter of Eq. 7 (> 0).
        lam: lambda of Eq. 13 (>= 0).
        magnitude: apply B to the encoders (Eq. 8).
        direction: ``"gradient"`` (paper, default), ``"weight"`` (official code) or ``"off"``.
        rule: ``"robust"`` (default, ours) or ``"paper"`` (raw Eq. 7).
        scale_on: ``"update"`` (default) or ``"gradient"`` (Eq. 8 literally).
        modality_parameters: each modality's encoder parameters, in modality order, for
            ``scale_on="update"`` when the model does not declare ``modality_parameters()``.
        rule_options: keyword options of the rule (``beta``, ``window``, ``tau`` for robust).
        classifier_lr, classifier_optimizer, classifier_weight_decay, classifier_momentum: the
            classifiers' own optimizer (``adam``, ``adamw`` or ``sgd``).
        classifier_layers: self-attention layers of the default sequence classifier (1-2).
        classifiers: optional user classifiers, one per modality, each with a ``last`` layer
            shaped like ``head_layer``; called as ``clf(h, mask=None, size=None)``.
        head_layer: the fused head's last layer; defaults to ``model.head_layer``.
    """

    name = "cggm"
    support = Support(needs="per-modality features and a fused head whose last layer is Linear or ConvNd")

    def __init__(
        self,
        rho: float = 1.3,
        lam: float = 0.2,
        magnitude: bool = True,
        direction: Direction = "gradient",
        rule: str = "robust",
        scale_on: ScaleOn = "update",
        rule_options: Mapping[str, Any] | None = None,
        classifier_lr: float = 5e-4,
        classifier_optimizer: str = "adam",
        classifier_weight_decay: float = 0.0,
        classifier_momentum: float = 0.9,
        classifier_layers: int = 1,
        classifiers: Sequence[nn.Module] | None = None,
        head_layer: nn.Module | None = None,
        modality_parameters: Sequence[Any] | None = None,
    ) -> None:
        super().__init__()
        if not rho > 0:
            raise ValueError(f"CGGM rho must be > 0, got {rho}.")
        if not lam >= 0:
            raise ValueError(f"CGGM lam (lambda) must be >= 0, got {lam}.")
        if direction not in ("gradient", "weight", "off"):
            raise ValueError(f"CGGM direction must be 'gradient', 'weight' or 'off', got {direction!r}.")
        if scale_on not in ("gradient", "update"):
            raise ValueError(f"CGGM scale_on must be 'gradient' or 'update', got {scale_on!r}.")
        if classifier_optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"classifier_optimizer must be 'adam', 'adamw' or 'sgd', got {classifier_optimizer!r}.")
        self.rho, self.lam = float(rho), float(lam)
        self.magnitude, self.direction, self.scale_on = bool(magnitude), direction, scale_on
        self.rule_name = rule
        self.rule = build_rule(rule, self.rho, **dict(rule_options or {}))
        self.classifier_lr = float(classifier_lr)
        self.classifier_optimizer_name = classifier_optimizer
        self.classifier_weight_decay = float(classifier_weight_decay)
        self.classifier_momentum = float(classifier_momentum)
        self.classifier_layers = int(classifier_layers)
        self.classifiers: nn.ModuleList | None = nn.ModuleList(classifiers) if classifiers is not None else None
        self.classifier_opt: torch.optim.Optimizer | None = None
        self._head_layer = head_layer
        self._modality_params = None if modality_parameters is None else [list(ps) for ps in modality_parameters]
        self._last_clf_grads: list[Tensor] = []
        self._stale_used: tuple[Tensor, list[Tensor], Tensor] | None = None
        self._pending_state: Mapping[str, Any] | None = None
        self._B: Tensor | None = None
        self._stale: tuple[Tensor, list[Tensor], Tensor] | None = None  # weight mode: W_F, W_i, b of step t-1
        self._eval_sums: Tensor | None = None

    @classmethod
    def official(cls, rho: float = 1.3, lam: float = 0.2, **kwargs: Any) -> CGGM:
        """The official code's behaviour (for comparison with published runs): raw Eq. 7 on
        consecutive batches, encoder gradients scaled by B, and the one-step-late cosine of
        weights (cggm-spec.md A1-A3). Its global gradient clipping (0.8) is a training setting
        (``clip_grad_norm``), set in the paper presets."""
        kwargs.setdefault("scale_on", "gradient")
        return cls(rho=rho, lam=lam, rule="paper", direction="weight", **kwargs)

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        if self.scale_on == "update" and self.magnitude:
            if self._modality_params is None:
                if not hasattr(self.model, "modality_parameters"):
                    raise TypeError(
                        "CGGM(scale_on='update') scales each encoder's update, so it needs each modality's "
                        "encoder parameters: pass modality_parameters=[enc_1.parameters(), ...] (in modality "
                        "order), use a cggm MultimodalModel, or choose scale_on='gradient'."
                    )
                declared = self.model.modality_parameters()
                self._modality_params = [list(declared[m]) for m in self.modalities]
            if len(self._modality_params) != len(self.modalities):
                raise ValueError(f"CGGM got parameters for {len(self._modality_params)} modalities, "
                                 f"expected {len(self.modalities)}.")
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
            raise TypeError("CGGM needs the fused head's last layer: pass head_layer=... or give the model a head_layer.")
        return layer

    def _build_classifiers(self, out: ModelOutput) -> None:
        hidden = head_layer_hidden(self.head_layer)
        # drawn from the global RNG, which is then put back: building them when a resumed run
        # loads their saved weights must not shift the random stream (dropout, ...) of the steps
        device = out.features[0].device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.classifiers = nn.ModuleList(
                build_classifier(h.detach(), hidden, self.task.num_outputs, self.classifier_layers)
                for h in out.features
            )
        self._check_classifier_shapes()
        self._make_optimizer()

    def _check_classifier_shapes(self) -> None:
        """Eq. 12 compares the head's last-layer gradient with each classifier's: same shapes."""
        want = tuple(self.head_layer.weight.shape)
        for m, clf in zip(self.modalities, self.classifiers):
            have = tuple(clf.last.weight.shape)
            if have != want:
                raise ValueError(
                    f"CGGM compares the fused head's last layer (weight {want}) with each classifier's last layer, "
                    f"but the classifier of {m!r} has {have}. The default classifiers end in a Linear or a 1x1 "
                    f"Conv2d: give the head such a last layer, or pass classifiers=... whose `last` matches it."
                )

    def _make_optimizer(self) -> None:
        params = self.classifiers.parameters()
        wd = self.classifier_weight_decay
        if self.classifier_optimizer_name == "sgd":
            self.classifier_opt = torch.optim.SGD(params, lr=self.classifier_lr, momentum=self.classifier_momentum,
                                                  weight_decay=wd)
        elif self.classifier_optimizer_name == "adamw":
            self.classifier_opt = torch.optim.AdamW(params, lr=self.classifier_lr, weight_decay=wd)
        else:
            self.classifier_opt = torch.optim.Adam(params, lr=self.classifier_lr, weight_decay=wd)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._load_modules(state)

    def modules(self) -> Mapping[str, nn.Module]:
        return {} if self.classifiers is None else {"classifiers": self.classifiers}

    # -- the step -------------------------------------------------------------------------------
    def _classify(self, out: ModelOutput, target: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Train the classifiers one step on detached features. Returns epsilon ``[M]`` (measured
        before the update) and each classifier's last-layer gradient. (``loss`` builds them first.)"""
        size = tuple(target.shape[-2:]) if self.task.kind == "segmentation" else None
        self.classifiers.train()
        self.classifier_opt.zero_grad(set_to_none=True)
        total = 0.0
        eps = []
        for i, (clf, h) in enumerate(zip(self.classifiers, out.features)):
            pred = clf(h.detach(), mask=out.mask(i), size=size)
            total = total + self.task.loss(pred, target)
            eps.append(self.task.batch_metric(pred, target))
        total.backward()
        distributed.average_gradients(self.classifiers.parameters())
        grads = [clf.last.weight.grad.detach().clone() for clf in self.classifiers]
        self.classifier_opt.step()
        eps_t = distributed.weighted_mean(torch.stack(eps), target.shape[0])
        return eps_t, grads

    def loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        if len(out.features) != len(self.modalities):
            raise ValueError(f"CGGM was bound to {len(self.modalities)} modalities but the model returned "
                             f"{len(out.features)} feature tensors.")
        if self.classifiers is None:
            self._build_classifiers(out)  # (also loads the saved ones on the first step after a resume)
        weights_before = None
        if self.direction == "weight":
            weights_before = [clf.last.weight.detach().clone() for clf in self.classifiers]
        eps, clf_grads = self._classify(out, target)
        self._last_clf_grads = clf_grads
        B = self.rule(eps)  # [M], Eq. 7 (or the robust rule)
        self._B = B
        for i, m in enumerate(self.modalities):
            self.record(f"B/{m}", B[i])
            self.record(f"eps/{m}", eps[i])

        if self.magnitude and self.scale_on == "gradient":
            for i, h in enumerate(out.features):
                if h.requires_grad:
                    h.register_hook(_scaler(B[i]))

        if self.direction == "gradient" and self.lam > 0:
            W_F = self.head_layer.weight
            g_F = torch.autograd.grad(task_loss, W_F, create_graph=True, retain_graph=True)[0]
            # under DDP: the global batch's g_F on every rank (differentiable; identity in one process)
            g_F = distributed.mean_over_ranks(g_F)
            cos = torch.stack([F.cosine_similarity(g_F.flatten(), g.flatten(), dim=0) for g in clf_grads])
            l_gm = gradient_modulation_loss(B.to(cos.dtype), cos)
            self._record_direction(cos, l_gm)
            return task_loss + self.lam * l_gm
        if self.direction == "weight":
            return self._weight_direction(task_loss, B, weights_before)
        return task_loss

    def _weight_direction(self, task_loss: Tensor, B: Tensor, weights_before: list[Tensor] | None) -> Tensor:
        """The official code's L_gm: cosines of weights from step t-1, added at step t (A1, A2)."""
        W_F = self.head_layer.weight
        loss = task_loss
        if self._stale is not None and self.lam > 0:
            stale_head, stale_clf, b = self._stale_used = self._stale
            # value of the stale weights, gradient flowing to the live parameter W_F
            head = W_F + (stale_head - W_F.detach())
            cos = torch.stack([F.cosine_similarity(head.flatten(), w.flatten(), dim=0) for w in stale_clf])
            l_gm = gradient_modulation_loss(b, cos)
            self._record_direction(cos, l_gm)
            loss = task_loss + self.lam * l_gm
        if weights_before is None:
            weights_before = [clf.last.weight.detach().clone() for clf in self.classifiers]
        self._stale = (W_F.detach().clone(), weights_before, (B / self.rho).detach())
        return loss

    def _record_direction(self, cos: Tensor, l_gm: Tensor) -> None:
        for i, m in enumerate(self.modalities):
            self.record(f"cos/{m}", cos[i])
        self.record("L_gm", l_gm)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not (self.magnitude and self.scale_on == "update") or self._B is None:
            optimizer.step()
            return
        groups = [[p for p in ps if p.requires_grad] for ps in self._modality_params]
        before = [torch._foreach_mul(ps, 1.0) if ps else [] for ps in groups]  # copies
        optimizer.step()
        for i, (ps, old) in enumerate(zip(groups, before)):
            if not ps:
                continue
            with torch.no_grad():
                torch._foreach_sub_(ps, old)  # the update
                torch._foreach_mul_(ps, self._B[i].to(ps[0].dtype))
                torch._foreach_add_(ps, old)

    # -- evaluation -----------------------------------------------------------------------------
    def eval_begin(self) -> None:
        self._eval_sums = None

    def eval_step(self, out: ModelOutput, target: Tensor) -> None:
        if self.classifiers is None:
            return
        size = tuple(target.shape[-2:]) if self.task.kind == "segmentation" else None
        self.classifiers.eval()
        with torch.no_grad():
            vals = torch.stack([
                self.task.batch_metric(clf(h, mask=out.mask(i), size=size), target)
                for i, (clf, h) in enumerate(zip(self.classifiers, out.features))
            ])
        n = float(target.shape[0])
        row = torch.cat([vals * n, vals.new_tensor([n])])
        self._eval_sums = row if self._eval_sums is None else self._eval_sums + row

    def eval_end(self) -> dict[str, float]:
        if self._eval_sums is None:
            return {}
        sums = distributed.all_reduce_sum(self._eval_sums).cpu()
        means = sums[:-1] / sums[-1]
        return {f"clf/{m}": float(v) for m, v in zip(self.modalities, means)}

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["rule"] = self.rule.state_dict()
        state["B"] = self._B
        state["stale"] = self._stale
        if self.classifiers is not None:
            state["classifiers"] = self.classifiers.state_dict()
            state["classifier_opt"] = self.classifier_opt.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.rule.load_state_dict(state.get("rule", {}))
        self._B = state.get("B")
        self._stale = state.get("stale")
        if "classifiers" in state:
            if self.classifiers is None:
                self._pending_state = state  # applied when the classifiers are built on the first batch
            else:
                self._load_modules(state)

    def _load_modules(self, state: Mapping[str, Any]) -> None:
        self.classifiers.load_state_dict(state["classifiers"])
        self.classifier_opt.load_state_dict(state["classifier_opt"])


def gradient_modulation_loss(B: Tensor, cos: Tensor) -> Tensor:
    """Eq. 12: ``(1/M) sum_i (|B_i| - B_i cos_i)``; B is a constant here (>= 0 by construction)."""
    B = B.detach()
    return (B.abs() - B * cos).mean()


def _scaler(b: Tensor):
    def hook(grad: Tensor) -> Tensor:
        return grad * b.to(grad.dtype)

    return hook
