"""Gradient-Blending (G-Blending)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..types import ModelOutput
from ._common import HeadMethod, epoch_losses
from .base import EpochContext, Support
from .registry import register_method


def gblend_weights(before: Tensor, after: Tensor, eps: float = 1e-8) -> Tensor:
    """Blending weights from losses measured at the start and end of a super-epoch.

    ``before`` and ``after`` are ``[2, K]``: row 0 the training loss L^T, row 1 the held-out loss
    L^V of each of the K heads. With overfitting O = L^V - L^T and generalisation G = L^V:

        dG_k = G_k(before) - G_k(after),   dO_k = O_k(after) - O_k(before),
        w_k  = max(dG_k, 0) / (dO_k^2 + eps),   normalised to sum 1

    (uniform weights if no head generalised better).
    """
    g_gain = before[1] - after[1]
    o_gain = (after[1] - after[0]) - (before[1] - before[0])
    w = g_gain.clamp_min(0) / (o_gain.square() + eps)
    total = w.sum()
    if not bool(total > 0):
        return torch.full_like(w, 1.0 / w.numel())
    return w / total


@register_method("gblending")
class GBlending(HeadMethod):
    """Gradient-Blending.

    W. Wang, D. Tran, M. Feiszli. "What Makes Training Multi-Modal Classification Networks Hard?"
    CVPR 2020, arXiv:1905.12681.

    The loss blends the fused head's loss and one unimodal head per modality:

        L = sum_k w_k L_k,   k in {modality heads} + {fused head},   sum_k w_k = 1,

    with w_k proportional to the ratio of generalisation gain to squared overfitting change over a
    super-epoch (see :func:`gblend_weights`). The unimodal heads are method-owned linear heads on the
    live (not detached) features, so their losses train the encoders, as in the paper's multi-head
    network; they have their own Adam optimizer.

    Schedule (online G-Blend): the weights start uniform; losses L^T (training split) and L^V
    (held-out split) of every head are measured at the start of training and after every
    ``super_epoch`` epochs (:meth:`on_epoch_end`), and the weights are recomputed from the last two
    measurements. Deviation: the paper estimates the weights by training a copy of each unimodal
    and multimodal model for one super-epoch on a held-out part of the training set; here the heads
    of the jointly trained model are measured along its own trajectory (no copies), and the
    engine's validation split is the held-out set. Records ``w/<head>`` and ``L/<head>``.
    """

    name = "gblending"
    source = 'Wang, Tran, Feiszli, "What Makes Training Multi-Modal Classification Networks Hard?", CVPR 2020 (arXiv:1905.12681)'
    support = Support(epoch_hooks=True)

    def __init__(self, super_epoch: int = 1, weights: Sequence[float] | None = None, head_lr: float = 1e-3,
                 head_weight_decay: float = 0.0) -> None:
        super().__init__(head_lr, head_weight_decay)
        if super_epoch < 1:
            raise ValueError(f"G-Blending super_epoch must be >= 1, got {super_epoch}.")
        self.super_epoch = int(super_epoch)
        self.initial = None if weights is None else [float(w) for w in weights]
        self.add_state("weights", None)  # [M+1] (set at bind)
        self.add_state("measured", None)  # [2, M+1] losses at the last measurement

    @property
    def head_names(self) -> list[str]:
        return [*self.modalities, "fused"]

    def setup(self) -> None:
        k = len(self.modalities) + 1
        if self.initial is not None and len(self.initial) != k:
            raise ValueError(f"G-Blending weights need {k} values (modalities then fused), got {len(self.initial)}.")
        if self.weights is None:
            self.weights = torch.tensor(self.initial) if self.initial else torch.full((k,), 1.0 / k)

    def head_losses(self, out: ModelOutput, target: Tensor, task_loss: Tensor | None = None) -> Tensor:
        uni = self.uni_logits(out, target)
        losses = [self.task.loss(z, target) for z in uni]
        losses.append(self.task.loss(out.prediction, target) if task_loss is None else task_loss)
        return torch.stack(losses)

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        losses = self.head_losses(out, target, task_loss)
        w = self.weights.to(device=losses.device, dtype=losses.dtype)
        for name, wk, lk in zip(self.head_names, w, losses):
            self.record(f"w/{name}", wk)
            self.record(f"L/{name}", lk.detach())
        return (w * losses).sum()

    def measure(self, ctx: EpochContext) -> Tensor:
        """``[2, M+1]``: mean train and held-out loss of every head."""
        def fn(out, target):
            return self.head_losses(out, target).detach()

        if self.heads.built:
            self.heads.modules.eval()
        train = epoch_losses(ctx, "train", fn)
        val = epoch_losses(ctx, "val", fn)
        return torch.stack([train, val]).cpu()

    def on_epoch_start(self, ctx: EpochContext) -> None:
        if self.measured is None:
            self.measured = self.measure(ctx)

    def on_epoch_end(self, ctx: EpochContext) -> None:
        if (ctx.epoch + 1) % self.super_epoch:
            return
        now = self.measure(ctx)
        if self.measured is not None:
            self.weights = gblend_weights(self.measured, now)
        self.measured = now
