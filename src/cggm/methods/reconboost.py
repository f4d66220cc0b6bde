"""ReconBoost: alternating boosting of modality learners."""

from __future__ import annotations

import copy

import torch
from torch import Tensor
from torch.nn import functional as F

from ..types import ModelOutput
from ._common import HeadMethod
from .base import EpochContext, Support
from .registry import register_method
from .state import AuxModules


def reconboost_loss(z_m: Tensor, others: Tensor, target: Tensor, w1: float, w2: float) -> Tensor:
    """Stage loss of the active learner: w1 * CE(z_m, y) + w2 * mean_i q_i log p_m(y_i | x_i),
    with q_i = softmax(others)_i[y_i] the (constant) ensemble of the other learners' probability of
    the true class. The second term lowers the weight of samples the others already get right."""
    logp = F.log_softmax(z_m, dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)
    q = F.softmax(others.detach(), dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)
    return -w1 * logp.mean() + w2 * (q * logp).mean()


@register_method("reconboost")
class ReconBoost(HeadMethod):
    """ReconBoost: one modality learner is updated per stage, against the others' ensemble.

    C. Hua et al. "ReconBoost: Boosting Can Achieve Modality
    Reconcilement". ICML 2024, arXiv:2405.09321.

    Learner m = encoder m + a method-owned linear head; the ensemble is F = sum_m z_m (the
    test-time prediction, :meth:`eval_prediction`). Stages alternate the modalities
    (m = stage mod M, a new stage every ``stage_epochs`` epochs, or every ``stage_steps`` steps
    if given). In a stage only learner m is trained, on

        L = w1 CE(z_m, y) + w2 mean_i q_i log p_m(y_i)            (see :func:`reconboost_loss`)
            + alpha MSE(softmax(z_m), softmax(z_m^prev))            (reconcilement / GA term)

    where q is the other learners' ensemble probability of the true class (detached) and z_m^prev
    the same learner as it was when this stage began (= at the end of its previous stage; the
    term is off during each learner's first stage). This follows the authors' code (defaults
    w1 = 5, w2 = 1, alpha = 0.5, peers.md 2.2). Not implemented: the authors' "correction" epochs
    that fine-tune the whole ensemble after each stage, and their pretrained-learner option. The
    model's own fusion head is not used. Cost: one frozen copy of the model and the heads (the
    state ``snapshot``), and one extra no-grad forward per step when the GA term is on. Records
    ``stage`` and ``L_ga``.
    """

    name = "reconboost"
    source = 'Hua et al., "ReconBoost: Boosting Can Achieve Modality Reconcilement", ICML 2024 (arXiv:2405.09321)'
    support = Support(tasks=("classification",), needs="per-modality features", ddp=False, unused_parameters=True,
                      epoch_hooks=True)

    def __init__(self, w1: float = 5.0, w2: float = 1.0, alpha: float = 0.5, stage_epochs: int = 1,
                 stage_steps: int | None = None, head_lr: float = 1e-3, head_weight_decay: float = 0.0) -> None:
        super().__init__(head_lr, head_weight_decay)
        if stage_epochs < 1 or (stage_steps is not None and stage_steps < 1):
            raise ValueError("ReconBoost stage_epochs and stage_steps must be >= 1.")
        self.w1, self.w2, self.alpha = float(w1), float(w2), float(alpha)
        self.stage_epochs, self.stage_steps = int(stage_epochs), stage_steps
        self.add_state("stage", 0)
        # the GA term's reference: the model and the heads as they were when stage ``snapshot_stage`` began
        self.add_state("snapshot_stage", None)
        self.add_state("snapshot", self._frozen_copies())
        self._batch = None  # this step's inputs and masks (transform_batch -> compute_loss)

    @property
    def active(self) -> int:
        return self.stage % len(self.modalities)

    def transform_batch(self, inputs, masks, training):
        if training:
            self._batch = (inputs, masks)
        return inputs, masks

    def _frozen_copies(self) -> AuxModules:
        """[model, heads], copied frozen when first used (or when a saved copy is loaded)."""
        return AuxModules(lambda _, i: copy.deepcopy(self.heads.modules if i else self.model).requires_grad_(False))

    def _previous_logits(self, out: ModelOutput) -> Tensor | None:
        if self.alpha <= 0 or self.stage < len(self.modalities) or self._batch is None:
            return None
        m = self.active
        if self.snapshot_stage != self.stage:
            self.snapshot, self.snapshot_stage = self._frozen_copies(), self.stage
        model_copy, head_copies = self.snapshot.ensure([out.features[m]] * 2)
        model_copy.train(self.model.training)
        inputs, masks = self._batch
        with torch.no_grad():
            h = model_copy.encode(inputs, masks)[m]
            return head_copies[m](h, out.mask(m))

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        m = self.active
        logits = self.uni_logits(out, target)
        prev = self._previous_logits(out)
        self._batch = None
        others = sum(z.detach() for j, z in enumerate(logits) if j != m)
        loss = reconboost_loss(logits[m], others, target, self.w1, self.w2)
        self.record("stage", torch.tensor(float(m)))
        if prev is not None:
            ga = F.mse_loss(F.softmax(logits[m], dim=1), F.softmax(prev, dim=1))
            self.record("L_ga", ga.detach())
            loss = loss + self.alpha * ga
        return loss

    def on_step_taken(self) -> None:
        # (the base class counts this step after commit: global_step + 1 steps are now taken)
        if self.stage_steps is not None and (self.global_step + 1) % self.stage_steps == 0:
            self.stage += 1

    def on_epoch_end(self, ctx: EpochContext) -> None:
        if self.stage_steps is None and (ctx.epoch + 1) % self.stage_epochs == 0:
            self.stage += 1

    def eval_prediction(self, out: ModelOutput) -> Tensor:
        return torch.stack(self.eval_logits(out)).sum(0)
