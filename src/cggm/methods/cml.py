"""CML: calibrating multimodal learning (confidence must not rise when a modality is removed)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import distributed
from ..types import ModelOutput
from .base import Method, Support
from .registry import register_method
from .state import SeededGenerator


def level_logits(model, out: ModelOutput, order: Tensor) -> list[Tensor]:
    """Logits at each level l = 0..M-1: the first l modalities of each sample's removal ``order``
    (``[B, M]`` modality indices, a permutation per row) zero-filled at the features, then
    ``model.predict``. Level 0 is ``out.prediction``."""
    M = order.shape[1]
    rank = order.argsort(dim=1)  # rank[b, m]: when modality m of sample b is removed
    levels = [out.prediction]
    for level in range(1, M):
        feats = []
        for m, h in enumerate(out.features):
            keep = (rank[:, m] >= level).to(h.dtype).view(-1, *([1] * (h.ndim - 1)))
            feats.append(h * keep)
        levels.append(model.predict(feats, out.masks))
    return levels


def cml_rank_official(levels: list[Tensor], target: Tensor, eps: float = 0.0) -> Tensor:
    """The authors' ranking term (batch sum over samples and consecutive levels), with c = max
    softmax and yhat = argmax: ``relu((c_{l+1} - c_l) 1[yhat_l = y] - eps)
    + relu((c_{l+1} - sg(c_l)) 1[yhat_l != y and yhat_{l+1} != y] - eps)``."""
    probs = [z.float().softmax(dim=1) for z in levels]
    conf = [p.max(dim=1).values for p in probs]
    right = [p.argmax(dim=1) == target for p in probs]
    total = conf[0].new_zeros(())
    for lv in range(len(levels) - 1):
        up = conf[lv + 1] - conf[lv]
        both_wrong = ~right[lv] & ~right[lv + 1]
        total = total + torch.relu(up * right[lv].to(up.dtype) - eps).sum()
        total = total + torch.relu((conf[lv + 1] - conf[lv].detach()) * both_wrong.to(up.dtype) - eps).sum()
    return total


def cml_rank_bmm(levels: list[Tensor]) -> Tensor:
    """BalanceMM's ranking term: ``sum_l max(0, sum_i (c_{l,i} - c_{l-1,i}))`` (hinge on the batch sum)."""
    conf = [z.float().softmax(dim=1).max(dim=1).values for z in levels]
    total = conf[0].new_zeros(())
    for lv in range(1, len(levels)):
        total = total + torch.relu((conf[lv] - conf[lv - 1]).sum())
    return total


@register_method("cml")
class CML(Method):
    """CML: train on full and reduced modality sets and penalise any confidence increase when a modality is removed.

    H. Ma, Q. Zhang, C. Zhang, B. Wu, H. Fu, J. T. Zhou, Q. Hu. "Calibrating Multimodal Learning".
    ICML 2023, arXiv:2306.01265; code QingyangZhang/CML:miwae/train.py@9d2496e; toolkit
    GeWu-Lab/BalanceBenchmark:balancemm/trainer/CML_trainer.py@4c1482f (spec:
    shared/docs/methods-balancemm.md section 6). Principle: for S' subset of S,
    conf(x_S') <= conf(x_S).

    Each step draws a removal order of the M modalities; level l (0..M-1) has the first l removed,
    by zero-filling their features and running ``model.predict`` (for a linear head on
    ``ConcatFusion`` this is exactly BalanceMM's z^(l) = z^(l-1) - W_m h_m). With c_l = max softmax
    and yhat_l = argmax of level l's logits z^(l),

        L = (1/M) sum_l CE(z^(l), y) + lam * rank,

    ``variant="official"`` (default, the authors' code): a random order per sample (from the
    method's seeded generator, restored on resume and rewound on a skipped step) and
        rank = sum_i sum_{l=0..M-2} [ relu((c_{l+1,i} - c_{l,i}) 1[yhat_{l,i} = y_i] - eps)
               + relu((c_{l+1,i} - sg(c_{l,i})) 1[yhat_{l,i} != y_i and yhat_{l+1,i} != y_i] - eps) ]
    (a per-sample hinge, summed over the batch as the code does, so its weight grows with B;
    ``eps = 0``). ``variant="bmm"``: one order per epoch shared by every sample (drawn from ``seed``
    and the epoch number, so a resumed run gets the same order), and
        rank = sum_{l=1..M-1} max(0, sum_i (c_{l,i} - c_{l-1,i}))
    (hinge on the batch sum, no correctness gating, no stop-gradient).

    Defaults: ``lam = 0.1`` = the code's beta/100 with beta = 10 (README) = BalanceMM's ``lam``; the
    CE weight is 1 (the code's alpha multiplies CE next to a reconstruction loss that is not part of
    this method). Deviations: missing modalities are zero-filled at the features, not mean-imputed
    at the input as the authors' code (its multi-view MLPs; real input imputation would need M
    encoder passes); BalanceMM's crash on the renamed ``Unimodality_Calculate`` is not reproduced.
    Evaluation scores the full-modality fused logits. Records ``cml/rank`` and ``cml/ce``.
    """

    name = "cml"
    source = 'Ma et al., "Calibrating Multimodal Learning", ICML 2023 (arXiv:2306.01265); code QingyangZhang/CML'
    support = Support(tasks=("classification",), needs="model.predict on (per-sample) zero-filled features; "
                                                       "M - 1 extra head passes per step")

    def __init__(self, lam: float = 0.1, variant: str = "official", eps: float = 0.0, seed: int | None = None) -> None:
        super().__init__()
        if variant not in ("official", "bmm"):
            raise ValueError(f"CML variant must be 'official' or 'bmm', got {variant!r}.")
        if not lam >= 0:
            raise ValueError(f"CML lam must be >= 0, got {lam}.")
        self.lam, self.variant, self.eps = float(lam), variant, float(eps)
        if variant == "bmm":  # (one removal order per epoch: a loop must tell it the epoch)
            self.uses_epochs(1)
        self.add_state("generator", SeededGenerator(seed))
        self.add_state("seed", seed)
        self.last_order: Tensor | None = None  # this step's removal order, [B, M] (for inspection)

    def setup(self) -> None:
        if self.seed is None:
            self.seed = int(distributed.broadcast_object(torch.initial_seed())) % 2**62

    def removal_order(self, batch: int, device: torch.device) -> Tensor:
        M = len(self.modalities)
        if self.variant == "bmm":
            g = torch.Generator().manual_seed(int(self.seed) * 1000003 + int(self.epoch))
            return torch.randperm(M, generator=g).to(device).expand(batch, M)
        g = self.generator.get(torch.device("cpu"))
        return torch.rand(batch, M, generator=g).argsort(dim=1).to(device)

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        order = self.removal_order(target.shape[0], target.device)
        self.last_order = order
        levels = level_logits(self.model, out, order)
        ce = (task_loss + sum(self.task.loss(z, target) for z in levels[1:])) / len(levels)
        if self.variant == "bmm":
            rank = cml_rank_bmm(levels)
        else:
            rank = cml_rank_official(levels, target, self.eps)
        self.record("cml/rank", rank.detach())
        self.record("cml/ce", ce.detach())
        return ce + self.lam * rank.to(ce.dtype)
