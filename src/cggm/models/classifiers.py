"""Auxiliary per-modality classifiers f_i (Eq. 5 of the CGGM paper).

They see detached features, are trained by their own optimizer, and are dropped at inference.
Each one ends in a layer ``last`` whose weight has the same shape as the fused head's last layer,
so Eq. 12 can compare the two gradients (or, in the official variant, the two weights).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .blocks import pool, transformer_stack


class VectorClassifier(nn.Module):
    """``[B, D] -> [B, C]``: Linear, ReLU, then ``last`` = Linear(hidden, C)."""

    def __init__(self, in_dim: int, hidden: int, num_outputs: int, dropout: float = 0.0):
        super().__init__()
        # (Identity for no dropout: same parameters and state-dict keys, one call fewer per step)
        self.body = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout) if dropout else nn.Identity())
        self.last = nn.Linear(hidden, num_outputs)

    def forward(self, h: Tensor, mask: Tensor | None = None, size=None) -> Tensor:
        # the same function as self.last(self.body(pool(h, mask))), in functional calls: this runs
        # once per modality per step, where on small models the six module calls cost more than the
        # arithmetic
        first, dropout = self.body[0], self.body[2]
        z = F.relu(F.linear(pool(h, mask), first.weight, first.bias))
        if isinstance(dropout, nn.Dropout):
            z = dropout(z)
        return F.linear(z, self.last.weight, self.last.bias)


class SequenceClassifier(nn.Module):
    """``[B, T, D] -> [B, C]``: 1-2 self-attention layers (as in the paper), masked mean pooling,
    Linear + ReLU, then ``last`` = Linear(hidden, C). ``attention``: the layers' implementation,
    ``"fast"`` or torch's ``"reference"`` (same parameters and function,
    :func:`~cggm.models.blocks.transformer_stack`)."""

    def __init__(self, in_dim: int, hidden: int, num_outputs: int, layers: int = 1, heads: int | None = None,
                 dropout: float = 0.0, attention: str = "fast"):
        super().__init__()
        heads = heads or _pick_heads(in_dim)
        self.attention = transformer_stack(in_dim, heads, 2 * in_dim, dropout, layers, attention)
        self.body = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
        self.last = nn.Linear(hidden, num_outputs)

    def forward(self, h: Tensor, mask: Tensor | None = None, size=None) -> Tensor:
        pad = None if mask is None else ~mask.bool()
        z = self.attention(h, src_key_padding_mask=pad)
        return self.last(self.body(pool(z, mask)))


class MapClassifier(nn.Module):
    """Light decoder for segmentation: ``[B, D, h, w] -> [B, C, H, W]``.

    3x3 conv, batch norm, ReLU, then ``last`` = 1x1 conv(hidden, C); bilinear upsampling to the
    target size.
    """

    def __init__(self, in_dim: int, hidden: int, num_outputs: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_dim, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU())
        self.last = nn.Conv2d(hidden, num_outputs, 1)

    def forward(self, h: Tensor, mask: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        out = self.last(self.body(h))
        if size is not None and tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out


def _pick_heads(dim: int) -> int:
    for h in (8, 5, 4, 2):
        if dim % h == 0:
            return h
    return 1


def build_classifier(feature: Tensor, hidden: int, num_outputs: int, sequence_layers: int = 1) -> nn.Module:
    """The default classifier for a feature tensor of this shape, on the feature's device."""
    if feature.ndim == 2:
        clf: nn.Module = VectorClassifier(feature.shape[1], hidden, num_outputs)
    elif feature.ndim == 3:
        clf = SequenceClassifier(feature.shape[2], hidden, num_outputs, layers=sequence_layers)
    elif feature.ndim == 4:
        clf = MapClassifier(feature.shape[1], hidden, num_outputs)
    else:
        raise ValueError(
            f"No default classifier for features of shape {tuple(feature.shape)}; expected [B, D], [B, T, D] "
            f"or [B, C, H, W]. Pass classifiers=... to use your own."
        )
    # fp32 master weights whatever the features' dtype (bf16 / fp16 under autocast); float64 stays
    dtype = torch.float64 if feature.dtype == torch.float64 else torch.float32
    return clf.to(device=feature.device, dtype=dtype)
