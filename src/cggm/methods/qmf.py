"""Quality-aware Multimodal Fusion (QMF)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ..types import ModelOutput
from ._common import HeadMethod
from .base import Support
from .registry import register_method


def qmf_fuse(logits: list[Tensor], temperature: float = 10.0) -> tuple[Tensor, list[Tensor]]:
    """Energy-weighted late fusion: w_m = logsumexp(z_m) / T (per sample, detached),
    fused = sum_m w_m z_m. Returns the fused logits and the (non-detached) confidences."""
    conf = [torch.logsumexp(z, dim=1) / temperature for z in logits]
    fused = sum(c.detach().unsqueeze(1) * z for c, z in zip(conf, logits))
    return fused, conf


def ranking_loss(conf: Tensor, correct: Tensor) -> Tensor:
    """Margin ranking between each sample and the next one in the batch: a sample that is right
    when its pair is wrong should have a higher confidence, by a margin of 1."""
    c2, k2 = conf.roll(1), correct.roll(1)
    sign = torch.sign(correct - k2)
    return F.relu(-sign * (conf - c2) + (correct - k2).abs()).mean()


@register_method("qmf")
class QMF(HeadMethod):
    """QMF: dynamic late fusion weighted by each modality's per-sample confidence.

    Q. Zhang et al. "Provable Dynamic Fusion for
    Low-Quality Multimodal Data". ICML 2023, arXiv:2306.02050.

    Unimodal logits z_m come from method-owned linear heads on the live features. The confidence
    of modality m on a sample is its negative free energy, w_m = logsumexp(z_m) / T (T = 10 as
    in the authors' code), used detached as the fusion weight:

        z = sum_m w_m z_m,   L = CE(z, y) + sum_m CE(z_m, y) + lam * sum_m R(w_m, c_m),

    R a margin ranking loss that makes confidence order samples by correctness c_m. Deviation:
    the authors rank by each sample's *historical* correctness frequency, which needs sample ids
    the batches do not carry; here c_m is the correctness on the current batch. The same fusion
    is the test-time prediction (:meth:`eval_prediction`); the model's own fusion head is not used.
    Records ``conf/<m>`` (batch mean).
    """

    name = "qmf"
    source = 'Zhang et al., "Provable Dynamic Fusion for Low-Quality Multimodal Data", ICML 2023'
    support = Support(tasks=("classification",), needs="per-modality features", ddp=False, unused_parameters=True)

    def __init__(self, temperature: float = 10.0, rank_weight: float = 0.1, head_lr: float = 1e-3,
                 head_weight_decay: float = 0.0) -> None:
        super().__init__(head_lr, head_weight_decay)
        if not temperature > 0:
            raise ValueError(f"QMF temperature must be > 0, got {temperature}.")
        self.temperature, self.rank_weight = float(temperature), float(rank_weight)

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        logits = self.uni_logits(out, target)
        fused, conf = qmf_fuse(logits, self.temperature)
        loss = F.cross_entropy(fused, target) + sum(F.cross_entropy(z, target) for z in logits)
        if self.rank_weight > 0:
            rank = sum(ranking_loss(c, (z.argmax(1) == target).to(c.dtype)) for c, z in zip(conf, logits))
            loss = loss + self.rank_weight * rank
        for m, c in zip(self.modalities, conf):
            self.record(f"conf/{m}", c.detach().mean())
        return loss

    def eval_prediction(self, out: ModelOutput) -> Tensor:
        return qmf_fuse(self.eval_logits(out), self.temperature)[0]
