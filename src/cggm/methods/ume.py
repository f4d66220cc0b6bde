"""Uni-Modal Ensemble (UME)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..types import ModelOutput
from ._common import HeadMethod
from .base import Support
from .registry import register_method


@register_method("ume")
class UME(HeadMethod):
    """UME: train each modality as its own model and ensemble them at test time.

    C. Du et al. "On Uni-Modal Feature
    Learning in Supervised Multi-Modal Learning". ICML 2023, arXiv:2305.01233.

    Unimodal model m = encoder m + a method-owned linear head on its live features. Training
    minimises sum_m L(f_m(h_m), y): each encoder gets gradient from its own head only, so no
    modality can suppress another. Test-time fusion (:meth:`eval_prediction`) averages the
    unimodal outputs, (1/M) sum_m f_m(h_m) (logits for classification, values for regression).
    The model's own fusion and head are not trained or used. Records ``L/<m>``.
    """

    name = "ume"
    source = 'Du et al., "On Uni-Modal Feature Learning in Supervised Multi-Modal Learning", ICML 2023 (UME)'
    support = Support(tasks=("classification", "regression"), needs="per-modality features", ddp=False,
                      unused_parameters=True)

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        losses = [self.task.loss(z, target) for z in self.uni_logits(out, target)]
        for m, loss_m in zip(self.modalities, losses):
            self.record(f"L/{m}", loss_m.detach())
        return torch.stack(losses).sum()

    def eval_prediction(self, out: ModelOutput) -> Tensor:
        return torch.stack(self.eval_logits(out)).mean(0)
