"""Classifier-guided Gradient Modulation (CGGM).

Z. Guo, T. Jin, J. Chen, Z. Zhao. "Classifier-guided Gradient Modulation for Enhanced Multimodal
Learning". NeurIPS 2024, arXiv:2411.01409. Equations refer to the paper; defects of the official
code (github zrguo/CGGM) are referenced as cggm-spec.md A1-A13.

CGGM is composed of parts, each an option stored once:

* **classifiers** (Eq. 5): each auxiliary classifier f_i sees ``h_i.detach()`` (fp32, outside
  autocast), so its loss never reaches the encoders; they are method-owned modules
  (:class:`~cggm.methods.state.AuxModules`) with their own optimizer, unused at inference. Their
  loss is a second root of the model's backward pass (:meth:`CGGM.compute_gradients`): one pass,
  with gradients identical to a pass of their own (unscaled by a GradScaler).
* **metric** epsilon and **where B acts** (Eq. 8): :mod:`cggm.methods.cggm.parts`.
* **rule** (Eq. 6-7): :mod:`cggm.methods.cggm.rules`; ``rho`` lives on the rule.
* **direction** (Eq. 9-13): :mod:`cggm.methods.cggm.direction`,
  ``L = L_task + lambda (1/M) sum_i (|B_i| - B_i cos(g_F, g_i))``, back-propagated once.

When each part moves: :meth:`~cggm.methods.protocol.StepProtocol.loss` measures the classifiers'
metrics and proposes B without changing any state; the classifiers step, the rule accepts and the
direction term keeps this step's weights only when the optimizer step is taken (under gradient
accumulation with the micro-batches' mean metric and mean classifier gradient; B on gradients is
refused there, since each micro-batch's gradient would carry its own B); a skipped step changes
nothing. Records per step: ``B/<modality>``, ``eps/<modality>``, ``cos/<modality>`` and ``L_gm``;
at evaluation ``clf/<modality>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ... import distributed
from ...models.base import head_layer_hidden
from ...models.classifiers import build_classifier
from ...types import ModelOutput
from ..base import Method, Support
from ..binding import UnsupportedSettingError
from ..protocol import ProtocolError, no_autocast
from ..registry import register_method
from ..state import AuxModules
from . import parts
from .direction import DIRECTIONS, DirectionTerm
from .rules import ImprovementRule, rule_with_rho


@register_method("cggm")
class CGGM(Method):
    """CGGM: classifier-guided magnitude (Eq. 7-8) and direction (Eq. 12-13) modulation.

    Args:
        rho: the scaling hyper-parameter of Eq. 7 (> 0), given to a rule named by ``rule`` (default
            1.3); a rule object carries its own (``CGGM(rule=RobustRule(2.0))``).
        lam: lambda of Eq. 13 (>= 0).
        magnitude: apply B to the encoders (Eq. 8).
        direction: ``"gradient"`` (paper, default), ``"weight"`` (official code), ``"off"``, or a
            :class:`~cggm.methods.cggm.direction.DirectionTerm`.
        rule: ``"robust"`` (default, ours), ``"paper"`` (raw Eq. 7), ``"underuse"``, or an ``ImprovementRule``.
        scale_on: ``"auto"`` (default), ``"gradient"`` or ``"update"`` (:mod:`~cggm.methods.cggm.parts`).
        metric: ``"task"``, ``"sign_accuracy"`` or ``"official"`` (:mod:`~cggm.methods.cggm.parts`).
        rule_options: keyword options of a rule given by name (``beta``, ``window``, ``tau`` for robust).
        classifier_lr, classifier_optimizer, classifier_weight_decay, classifier_momentum: the
            classifiers' own optimizer (``adam``, ``adamw`` or ``sgd``).
        classifier_layers: self-attention layers of the default sequence classifier (1-2).
        classifiers: optional user classifiers, one per modality, each with a ``last`` layer shaped
            like ``head_layer``; called as ``clf(h, mask=None, size=None)``.
        head_layer: the fused head's last layer; defaults to ``model.head_layer``.
        modality_parameters: each modality's encoder parameters (also accepted by ``bind``).
    """

    name = "cggm"
    source = 'Guo, Jin, Chen, Zhao, "Classifier-guided Gradient Modulation for Enhanced Multimodal Learning", NeurIPS 2024 (arXiv:2411.01409); code zrguo/CGGM'
    support = Support(edits_gradients=True, accumulates=True,  # (its classifiers' gradients only add up)
                      needs="per-modality features and a fused head whose last layer is Linear or ConvNd")

    def __init__(self, rho: float | None = None, lam: float = 0.2, magnitude: bool = True,
                 direction: str | DirectionTerm = "gradient", rule: str | ImprovementRule = "robust",
                 scale_on: str = "auto", metric: str = "task", rule_options: Mapping[str, Any] | None = None,
                 classifier_lr: float = 5e-4, classifier_optimizer: str = "adam", classifier_weight_decay: float = 0.0,
                 classifier_momentum: float = 0.9, classifier_layers: int = 1,
                 classifiers: Sequence[nn.Module] | None = None, head_layer: nn.Module | None = None,
                 modality_parameters: Sequence[Any] | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if not (lam >= 0 and lam < float("inf")):
            raise ValueError(f"CGGM lam (lambda) must be a finite number >= 0, got {lam}.")
        if scale_on not in parts.SCALE_ON:
            raise ValueError(f"CGGM scale_on must be 'auto', 'gradient' or 'update', got {scale_on!r}.")
        if classifier_optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"classifier_optimizer must be 'adam', 'adamw' or 'sgd', got {classifier_optimizer!r}.")
        if not classifier_lr > 0:
            raise ValueError(f"classifier_lr must be > 0, got {classifier_lr}.")
        if classifier_weight_decay < 0:
            raise ValueError(f"classifier_weight_decay must be >= 0, got {classifier_weight_decay}.")
        self.lam, self.magnitude, self.scale_on = float(lam), bool(magnitude), scale_on
        self.epsilon = parts.Epsilon(metric)
        self.add_state("rule", rule_with_rho(rule, rho, rule_options))
        if isinstance(direction, str) and direction not in (*DIRECTIONS, "off"):
            raise ValueError(f"CGGM direction must be 'gradient', 'weight' or 'off', got {direction!r}.")
        term = direction if isinstance(direction, DirectionTerm) else DIRECTIONS.get(direction, lambda: None)()
        self.add_state("direction_term", term)
        self.classifier_layers = int(classifier_layers)
        self.add_state("auxiliary", AuxModules(
            self._build_classifier, modules=classifiers, optimizer=classifier_optimizer, lr=classifier_lr,
            weight_decay=classifier_weight_decay, momentum=classifier_momentum, fused=True, scaled=False,
            mean_over_micro_batches=True))
        self._head_layer, self._given_params = head_layer, modality_parameters
        self._clf_loss: Tensor | None = None  # the classifiers' loss, a root of this micro-batch's backward
        self._eval_metric: parts.ClassifierMetric | None = None
        self._where: str | None = None  # where this step's B acts, chosen at its first loss
        if self.magnitude:
            parts.check_where(scale_on, self.rule)

    @property
    def classifiers(self) -> nn.ModuleList | None:
        """The auxiliary classifiers (built on the first batch), or None before."""
        return self.auxiliary.modules

    @property
    def classifier_opt(self) -> torch.optim.Optimizer | None:
        return self.auxiliary.optimizer

    @property
    def rho(self) -> float:
        return self.rule.rho

    @property
    def metric(self) -> str:
        return self.epsilon.name

    @property
    def direction(self) -> str:
        return "off" if self.direction_term is None else self.direction_term.name

    @classmethod
    def official(cls, rho: float = 1.3, lam: float = 0.2, **kwargs: Any) -> CGGM:
        """The official code's behaviour (for comparison with published runs): raw Eq. 7 on
        consecutive batches in the published code's form (``rule="paper"`` with
        ``rule_options={"formula": "official"}``: the 1e-8 guard in the numerator too, so B is rho for
        every encoder when no metric changes), the official metric (A9), encoder gradients scaled by B
        before clipping (``scale_on="gradient"``) and the one-step-late cosine of weights
        (``direction="weight"``) (cggm-spec.md A1-A3, A9). Its gradient clipping (0.8) is a training
        setting (``clip_grad_norm``), set in the paper presets."""
        kwargs.setdefault("scale_on", "gradient")
        kwargs.setdefault("metric", "official")
        kwargs.setdefault("rule", "paper")
        kwargs.setdefault("direction", "weight")
        if kwargs["rule"] == "paper":  # (a rule given by name: the published formula unless told otherwise)
            kwargs["rule_options"] = {"formula": "official", **dict(kwargs.get("rule_options") or {})}
        return cls(rho=rho, lam=lam, **kwargs)

    # -- set-up ---------------------------------------------------------------------------------
    def bind(self, model, task, modalities=None, *, modality_parameters=None, optimizer=None):
        if modality_parameters is None:
            modality_parameters = self._given_params
        return super().bind(model, task, modalities, modality_parameters=modality_parameters, optimizer=optimizer)

    def setup(self) -> None:
        self.epsilon.bind(self.task)
        try:  # the head's last layer is compared with the classifiers': refuse now if there is none
            head_layer_hidden(self.head_layer)
        except TypeError as err:
            raise UnsupportedSettingError(str(err)) from err
        if self.magnitude and self.scale_on == "update":
            self.modality_parameter_groups()  # raises now if they cannot be found or overlap
        self.auxiliary.on_built = self._check_classifiers
        if self.auxiliary.built:
            self._check_classifiers(self.auxiliary.modules)

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        super().set_optimizer(optimizer)
        if self.magnitude and self.scale_on == "update":
            parts.warn_update_scaling_of_sgd(optimizer)

    def where_B_acts(self) -> str:
        """``"gradient"`` or ``"update"``: ``scale_on`` with ``"auto"`` resolved from the optimizer."""
        return parts.where_B_acts(self.scale_on, self.rule, self.optimizer)

    @property
    def head_layer(self) -> nn.Module:
        layer = self._head_layer if self._head_layer is not None else getattr(self.model, "head_layer", None)
        if layer is None:
            raise UnsupportedSettingError(
                "CGGM needs the fused head's last layer: pass head_layer=... or give the model a head_layer.")
        return layer

    def _build_classifier(self, h: Tensor, i: int) -> nn.Module:
        return build_classifier(h, head_layer_hidden(self.head_layer), self.task.num_outputs, self.classifier_layers)

    def _check_classifiers(self, classifiers: nn.ModuleList) -> None:
        parts.check_classifiers(classifiers, self.head_layer, self.modalities)

    # -- the step -------------------------------------------------------------------------------
    def _classify(self, out: ModelOutput, target: Tensor) -> tuple[Tensor, Tensor]:
        """Each classifier on its detached features, in fp32 outside autocast: epsilon ``[M]``
        (averaged over DDP ranks) and the sum of the classifiers' losses. Nothing is stepped."""
        classifiers = self.auxiliary.ensure(out.features)  # (also loads the saved ones after a resume)
        size = self.task.target_size(target)
        if not classifiers.training:
            classifiers.train()
        with no_autocast(out.features[0].device.type):
            losses, preds = [], []
            for i, (clf, h) in enumerate(zip(classifiers, out.features)):
                pred = clf(h.detach().to(clf.last.weight.dtype), mask=out.mask(i), size=size)
                losses.append(self.task.loss(pred, target))
                preds.append(pred)
        total = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        return distributed.weighted_mean(self.epsilon(preds, target), target.shape[0]), total

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        where = self.where_B_acts() if self.magnitude else None
        if where == "gradient" and self.micro_batch:
            raise ProtocolError(
                "CGGM with B on gradients under gradient accumulation: each micro-batch's gradient would carry the B "
                "of that micro-batch alone, not the B of the step's mean metric, so the step would differ from one "
                "batch of the same samples. Take one optimizer step per batch, or scale_on='update'.")
        eps, clf_loss = self._classify(out, target)
        proposal = self.rule.propose(eps)  # B [M], Eq. 7 (or another rule), and the rule's next state
        B = proposal[0]
        self.stage("eps", eps)
        self.stage("proposal", proposal)
        # the classifiers' loss is a second root of this micro-batch's backward (compute_gradients)
        self._clf_loss = clf_loss if not self.micro_batch or self._clf_loss is None else self._clf_loss + clf_loss
        self._where = where
        self._record("B", B)
        self._record("eps", eps)
        if where == "gradient":
            self.scale_feature_gradients(out, B)
        term = None if self.direction_term is None else self.direction_term.loss(self, task_loss, B, clf_loss)
        if term is None:
            return task_loss
        l_gm, cos = term
        self._record("cos", cos)
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

    def _step_proposal(self) -> tuple[Tensor, dict[str, Any]]:
        """B and the rule's next state for the step: one micro-batch's proposal, or the mean metric's."""
        proposals = self.staged("proposal", all=True)
        if len(proposals) == 1:
            return proposals[0]
        proposal = self.rule.propose(self.staged("eps"))
        self._record("B", proposal[0])  # (the B applied, not the last micro-batch's)
        self._record("eps", self.staged("eps"))
        return proposal

    def wrap_optimizer_step(self, take_step) -> bool:
        if not self.magnitude:
            return take_step()
        where = self.where_B_acts()
        if where != self._where:
            raise ProtocolError(f"CGGM chose where B acts from the optimizer it was bound to, but is stepped with "
                                f"{type(self.optimizer).__name__}, which needs B on {where}s: bind it with (or "
                                f"set_optimizer) the optimizer you step.")
        if where != "update":
            return take_step()
        return parts.scale_updates(self.modality_parameter_groups(), self._step_proposal()[0], take_step)

    def on_step_taken(self) -> None:
        """The classifiers (a declared state item) have stepped; the rule accepts the step's proposal."""
        self.rule.accept(self._step_proposal()[1])

    def _record(self, prefix: str, values: Tensor) -> None:
        for i, m in enumerate(self.modalities):
            self.record(f"{prefix}/{m}", values[i])

    # -- evaluation -----------------------------------------------------------------------------
    def eval_metrics(self) -> dict[str, Any]:
        if self._eval_metric is None:
            self._eval_metric = parts.ClassifierMetric(self)
        return {"clf": self._eval_metric}

