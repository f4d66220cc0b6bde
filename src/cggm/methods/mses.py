"""MSES: modality-specific early stopping (our specification from the paper's abstract)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..types import ModelOutput
from ._common import HeadMethod, epoch_losses
from .base import Support
from .registry import register_method


@register_method("mses")
class MSES(HeadMethod):
    """MSES: unimodal heads watch each modality's validation loss; a modality that stops improving has its encoder frozen.

    Y. Fujimori et al. "Modality-specific early stopping" (title as cited by the spec), ACPR 2019;
    abstract only (https://openreview.net/forum?id=On2HBy27Y5a), no code found. **This is our own
    specification** (shared/docs/methods-balancemm.md section 11), written from the abstract: a
    multitask model with modality-specific classifiers and a multimodal classifier detects
    over-fitting per modality and early-stops each modality separately. Nothing below is
    verified against the paper.

    Method-owned unimodal heads f_m (linear, own Adam optimizer, lr 1e-3) on the live features:

        L = L_task(fused) + sum_{m not stopped} L_task(f_m(h_m)).

    After each epoch (:meth:`on_epoch_end`) the validation loss v_m of each head f_m is measured
    (mean over the ``val`` split, model and heads in eval mode). If v_m < best_m - ``min_delta``,
    best_m = v_m; otherwise modality m's count of epochs without improvement grows, and when it
    reaches ``patience`` (default 5, our choice) modality m is stopped: its encoder's parameters
    and f_m get ``requires_grad = False`` (so no optimizer moves them, momentum included; re-applied
    after a resume), and with ``restore_best=True`` they are first set back to their weights at
    best_m. The fused head (the model's fusion and head) keeps training. Deviations: training does
    not end when every modality is stopped (the trainer's own epochs and selection decide); the
    stopping decision is taken on each process's validation pass, so DDP is refused. Evaluation
    scores the fused prediction. Records ``mses/stopped`` (how many modalities are stopped).
    """

    name = "mses"
    source = ('Fujimori et al., "Modality-specific early stopping", ACPR 2019 (abstract only, '
              'https://openreview.net/forum?id=On2HBy27Y5a; no code; our specification)')
    support = Support(tasks=("classification", "regression"), needs="a model that declares modality_parameters()",
                      ddp=False, unused_parameters=True, epoch_hooks=True)

    def __init__(self, patience: int = 5, min_delta: float = 0.0, restore_best: bool = False, head_lr: float = 1e-3,
                 head_weight_decay: float = 0.0) -> None:
        super().__init__(head_lr, head_weight_decay)
        if int(patience) < 1:
            raise ValueError(f"MSES patience must be >= 1 epoch, got {patience}.")
        self.patience, self.min_delta, self.restore_best = int(patience), float(min_delta), bool(restore_best)
        self.add_state("best", None)  # [M] best validation loss per modality
        self.add_state("bad_epochs", None)  # [M] epochs without improvement
        self.add_state("stopped_at", None)  # [M] the epoch a modality was stopped (-1: training)
        self.add_state("best_weights", {})  # restore_best: {i: [encoder tensors..., head tensors...]}

    def setup(self) -> None:
        self.modality_parameter_groups()  # refuses a model without modality_parameters()
        M = len(self.modalities)
        if self.best is None:
            self.best, self.bad_epochs, self.stopped_at = [float("inf")] * M, [0] * M, [-1] * M

    def stopped(self, i: int) -> bool:
        return int(self.stopped_at[i]) >= 0

    def _params(self, i: int) -> list[torch.nn.Parameter]:
        enc = list(self._all_modality_parameters()[i])
        return enc + (list(self.heads.modules[i].parameters()) if self.heads.built else [])

    def _all_modality_parameters(self) -> list[list[torch.nn.Parameter]]:
        self.modality_parameter_groups()
        return self._all_groups

    def _apply_stops(self) -> None:
        for i in range(len(self.modalities)):
            if self.stopped(i):
                for p in self._params(i):
                    p.requires_grad_(False)
                    p.grad = None  # (an optimizer would still move a zero gradient with its momentum)

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        logits = self.uni_logits(out, target)
        self._apply_stops()
        loss = task_loss
        for i, z in enumerate(logits):
            if not self.stopped(i):
                loss = loss + self.task.loss(z, target)
        self.record("mses/stopped", torch.tensor(float(sum(self.stopped(i) for i in range(len(logits))))))
        return loss

    def validation_losses(self, ctx) -> list[float]:
        """Each head's mean validation loss (the ``val`` split, eval mode)."""
        def fn(out, target):
            return torch.stack([self.task.loss(z, target).float() for z in self.eval_logits(out)])
        was = self.heads.modules.training if self.heads.built else True
        try:
            return [float(v) for v in epoch_losses(ctx, "val", fn)]
        finally:
            if self.heads.built:
                self.heads.modules.train(was)

    def on_epoch_start(self, ctx) -> None:
        self._apply_stops()

    def on_epoch_end(self, ctx) -> None:
        if not self.heads.built:
            return
        losses = self.validation_losses(ctx)
        for i, v in enumerate(losses):
            if self.stopped(i):
                continue
            if v < self.best[i] - self.min_delta:
                self.best[i], self.bad_epochs[i] = v, 0
                if self.restore_best:
                    self.best_weights[i] = [p.detach().clone() for p in self._params(i)]
                continue
            self.bad_epochs[i] += 1
            if self.bad_epochs[i] >= self.patience:
                if self.restore_best and i in self.best_weights:
                    with torch.no_grad():
                        for p, w in zip(self._params(i), self.best_weights[i]):
                            p.copy_(w.to(p.device, p.dtype))
                self.stopped_at[i] = int(self.epoch)
        self._apply_stops()
