"""Prototypical Modal Rebalance (PMR)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from .. import distributed
from ..models.blocks import pool
from ..types import ModelOutput
from ._common import in_window, others_mean, true_class_prob
from .base import EpochContext, Method, Support
from .registry import register_method


def prototype_logits(h: Tensor, prototypes: Tensor, distance: str = "euclidean") -> Tensor:
    """``-||h - c_k||`` (``euclidean``, as the authors' code) or ``-||h - c_k||^2`` (``squared``)
    for pooled features ``[B, D]`` and prototypes ``[C, D]``: ``[B, C]``. The Euclidean distance is
    floored at 1e-6 so its gradient stays finite when a feature sits on a prototype."""
    sq = (h.unsqueeze(1) - prototypes.unsqueeze(0).to(h.dtype)).square().sum(-1)
    if distance == "squared":
        return -sq
    return -sq.clamp_min(1e-12).sqrt()


@register_method("pmr")
class PMR(Method):
    """PMR: a prototype cross-entropy that speeds up the weaker modality.

    Y. Fan et al. "PMR: Prototypical Modal Rebalance for Multimodal
    Learning". CVPR 2023, arXiv:2211.07089.

    Prototypes c_m^k are the class means of each modality's (pooled) features over the training
    split, recomputed at every epoch start (no grad, eval mode) and smoothed with momentum:
    c <- mu c_old + (1 - mu) c_new. Prototype logits are p_m(k | x) ~ exp(-||h_m - c_m^k||^2).
    Per batch, s_m = sum_i softmax(p_m)[y_i] (summed over DDP ranks) and
    rho_m = s_m / mean_{j != m} s_j. The loss is

        L = L_task + sum_m beta_m CE(p_m, y),   beta_m = alpha if rho_m < 1 else 0,

    so the prototype loss acts on the weaker modality only and pulls its encoder towards
    class-separable features (prototypes are constants). Distances are Euclidean, as in the
    authors' code (``distance="squared"`` gives the squared distance instead). This follows the authors' code (a
    constant alpha on the weaker modality, peers.md 2.2); the paper's prototype-entropy
    regulariser on the dominant modality (early epochs) is not implemented. For M > 2 the
    ratio to the others' mean is an extension. Until prototypes exist (an epoch start that saw no
    training batch) they come from the first step's class means (the mean over its micro-batches);
    a class absent there gets the batch mean. Records ``rho/<m>`` and ``beta/<m>``.
    """

    name = "pmr"
    source = 'Fan et al., "PMR: Prototypical Modal Rebalance for Multimodal Learning", CVPR 2023'
    support = Support(tasks=("classification",), needs="per-modality vector or sequence features", epoch_hooks=True)

    def __init__(self, alpha: float = 0.6, momentum: float = 0.5, start_epoch: int = 0, end_epoch: int | None = None,
                 distance: str = "euclidean") -> None:
        super().__init__()
        if distance not in ("euclidean", "squared"):
            raise ValueError(f"PMR distance must be 'euclidean' or 'squared', got {distance!r}.")
        self.distance = distance
        if not alpha >= 0:
            raise ValueError(f"PMR alpha must be >= 0, got {alpha}.")
        if not 0 <= momentum < 1:
            raise ValueError(f"PMR momentum must be in [0, 1), got {momentum}.")
        self.alpha, self.momentum = float(alpha), float(momentum)
        self.start_epoch, self.end_epoch = int(start_epoch), end_epoch
        self.add_state("prototypes", None)  # one [C, D] tensor per modality

    def _class_means(self, pooled: list[Tensor], target: Tensor) -> tuple[list[Tensor], Tensor]:
        C = self.task.num_outputs
        onehot = F.one_hot(target.long(), C).to(pooled[0].dtype)  # [B, C]
        sums = [onehot.t() @ h for h in pooled]
        return sums, onehot.sum(0)

    def _means(self, sums: list[Tensor], counts: Tensor, fallback: list[Tensor]) -> list[Tensor]:
        out = []
        for s, fb in zip(sums, fallback):
            present = (counts > 0).unsqueeze(1)
            out.append(torch.where(present, s / counts.clamp_min(1).unsqueeze(1), fb.unsqueeze(0).expand_as(s)))
        return out

    def on_epoch_start(self, ctx: EpochContext) -> None:
        model = ctx.model
        was = model.training
        model.eval()
        sums, counts, n, total = None, None, 0, None
        with torch.no_grad():
            for inputs, masks, target in ctx.batches("train"):
                out = ctx.forward(inputs, masks)
                pooled = [pool(h, out.mask(i)).float() for i, h in enumerate(out.features)]
                s, c = self._class_means(pooled, target)
                sums = s if sums is None else [a + b for a, b in zip(sums, s)]
                counts = c if counts is None else counts + c
                t = [h.sum(0) for h in pooled]
                total = t if total is None else [a + b for a, b in zip(total, t)]
                n += int(target.shape[0])
        model.train(was)
        if sums is None:
            return
        sums = [distributed.all_reduce_sum(s) for s in sums]
        counts = distributed.all_reduce_sum(counts)
        new = self._means(sums, counts, [t / max(n, 1) for t in total])
        if self.prototypes is None:
            self.prototypes = new
        else:
            self.prototypes = [self.momentum * old + (1 - self.momentum) * c for old, c in zip(self.prototypes, new)]

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        pooled = [pool(h, out.mask(i)) for i, h in enumerate(out.features)]
        prototypes = self.prototypes
        if prototypes is None:  # kept when the step is taken
            with torch.no_grad():
                det = [h.detach().float() for h in pooled]
                sums, counts = self._class_means(det, target)
                prototypes = self._means(sums, counts, [h.mean(0) for h in det])
            self.stage("prototypes", prototypes)
        logits = [prototype_logits(h, c.to(h.device), self.distance) for h, c in zip(pooled, prototypes)]
        with torch.no_grad():
            scores = distributed.all_reduce_sum(torch.stack([true_class_prob(z, target).sum() for z in logits]))
            rho = scores / others_mean(scores).clamp_min(1e-12)
            beta = (rho < 1).to(task_loss.dtype) * self.alpha
        for i, m in enumerate(self.modalities):
            self.record(f"rho/{m}", rho[i])
            self.record(f"beta/{m}", beta[i])
        if not in_window(self.epoch, self.start_epoch, self.end_epoch):
            return task_loss
        extra = sum(beta[i] * F.cross_entropy(z, target) for i, z in enumerate(logits))
        return task_loss + extra

    def on_step_taken(self) -> None:
        if self.prototypes is None:
            self.prototypes = self.staged("prototypes")
