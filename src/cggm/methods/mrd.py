"""Modality Random Dropout (MRD)."""

from __future__ import annotations

import torch

from .base import Method
from .registry import register_method


@register_method("mrd")
class MRD(Method):
    """Modality Random Dropout: during training, each modality of each sample is replaced by zeros
    with probability ``p``, independently (evaluation batches are left whole).

    The CGGM paper (Guo et al., NeurIPS 2024, arXiv:2411.01409) compares with MRD without a
    citation; this is the usual form of the technique (modality dropout as a regulariser that
    forces the model to use every modality alone).

    For sample b and modality m, ``d_bm ~ Bernoulli(p)`` and ``x_bm <- (1 - d_bm) x_bm``. With
    ``keep_one=True`` (default) a sample whose modalities were all dropped gets one of them back,
    chosen uniformly, so the marginal drop rate is ``p - p^M / M``; with ``keep_one=False`` it is
    exactly ``p``. Padding masks are left unchanged (the zeroed tokens stay "real", as zero inputs).
    Randomness comes from torch's global generator on the inputs' device (restored on resume by the
    engine's RNG checkpoint). Records ``drop/<modality>``: the fraction dropped in the batch.
    """

    name = "mrd"
    source = 'Modality Random Dropout, compared without a citation in the CGGM paper (arXiv:2411.01409)'

    def __init__(self, p: float = 0.3, keep_one: bool = True) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"MRD p must be in [0, 1), got {p}.")
        self.p, self.keep_one = float(p), bool(keep_one)

    def drop_mask(self, batch: int, device: torch.device) -> torch.Tensor:
        """``[B, M]`` bool, True where a modality is dropped."""
        m = len(self.modalities)
        drop = torch.rand(batch, m, device=device) < self.p
        if self.keep_one:
            restore = torch.randint(0, m, (batch,), device=device)
            all_dropped = drop.all(dim=1, keepdim=True)
            chosen = torch.arange(m, device=device).unsqueeze(0) == restore.unsqueeze(1)
            drop = drop & ~(all_dropped & chosen)
        return drop

    def transform_batch(self, inputs, masks, training):
        if not training:
            return inputs, masks
        first = inputs[self.modalities[0]]
        drop = self.drop_mask(first.shape[0], first.device)
        out = dict(inputs)
        for i, m in enumerate(self.modalities):
            x = inputs[m]
            keep = (~drop[:, i]).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
            out[m] = x * keep
            self.record(f"drop/{m}", drop[:, i].float().mean())
        return out, masks
