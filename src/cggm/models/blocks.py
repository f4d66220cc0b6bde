"""Reference building blocks: encoders, fusion modules and heads.

Shapes: ``B`` batch, ``T`` tokens, ``D`` feature width, ``C`` outputs.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from .fast import FastEncoder, FastEncoderLayer, fast_dropout

Attention = Literal["fast", "reference"]
ATTENTION_IMPLEMENTATIONS: tuple[str, ...] = ("fast", "reference")


def transformer_stack(d_model: int, heads: int, dim_feedforward: int, dropout: float, layers: int,
                      attention: str = "fast") -> nn.Module:
    """``layers`` pre-LN encoder layers (batch first, ReLU), with the parameters of
    ``nn.TransformerEncoder(nn.TransformerEncoderLayer(...))`` whatever the implementation:
    ``"fast"`` (:mod:`cggm.models.fast`, the default) or ``"reference"`` (torch's modules). The two
    compute the same function and their state_dicts load into each other."""
    if attention == "fast":
        return FastEncoder(FastEncoderLayer(d_model, heads, dim_feedforward, dropout), layers)
    if attention == "reference":
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=dim_feedforward, dropout=dropout, batch_first=True, norm_first=True
        )
        return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {attention!r}.")


class MLPEncoder(nn.Module):
    """Vector encoder: ``[B, in_dim] -> [B, out_dim]`` (Linear, ReLU, dropout) x layers."""

    def __init__(self, in_dim: int, out_dim: int = 64, hidden: int = 128, layers: int = 2, dropout: float = 0.0):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        mods: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), nn.ReLU()]
            if dropout > 0:
                mods.append(nn.Dropout(dropout))
        self.net = nn.Sequential(*mods)
        self.out_dim = out_dim

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.net(x.flatten(1))


def sinusoidal_positions(length: int, dim: int, device=None, dtype=None) -> Tensor:
    """``[length, dim]`` sinusoidal position codes (Vaswani et al. 2017)."""
    pos = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe.to(dtype) if dtype is not None else pe


class SequenceEncoder(nn.Module):
    """MulT-style sequence encoder: ``[B, T, in_dim] -> [B, T, d_model]``.

    A Conv1d input projection (kernel 1, as in MulT), sinusoidal positions, embedding dropout and a
    pre-LN transformer encoder that honours the padding mask (``[B, T]``, True on real tokens).
    ``attention`` picks the encoder's implementation (:func:`transformer_stack`); a sample whose
    tokens are all padding gets a zero attention output in every layer, with either.
    """

    def __init__(
        self,
        in_dim: int,
        d_model: int = 40,
        heads: int = 5,
        layers: int = 2,
        dropout: float = 0.1,
        embed_dropout: float = 0.0,
        ff_mult: int = 4,
        attention: Attention = "fast",
    ):
        super().__init__()
        self.proj = nn.Conv1d(in_dim, d_model, kernel_size=1, bias=False)
        self.scale = math.sqrt(d_model)
        self.embed_dropout = nn.Dropout(embed_dropout)
        self.encoder = transformer_stack(d_model, heads, ff_mult * d_model, dropout, layers, attention)
        self.attention = attention
        self.norm = nn.LayerNorm(d_model)
        self.out_dim = d_model

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.proj(x.transpose(1, 2)).transpose(1, 2)  # [B, T, D]
        h = h * self.scale + sinusoidal_positions(h.shape[1], h.shape[2], h.device, h.dtype)
        if self.attention == "fast":
            h = fast_dropout(h, self.embed_dropout.p, self.training)
        else:
            h = self.embed_dropout(h)
        pad = None if mask is None else ~mask.bool()
        return self.norm(self.encoder(h, src_key_padding_mask=pad))


class ConcatFusion(nn.Module):
    """Late fusion by concatenation of pooled features: ``list[B, D_i] -> [B, sum D_i]``.

    Sequence features are mean-pooled over their real tokens first.
    """

    def forward(self, features: list[Tensor], masks: list[Tensor | None] | None = None) -> Tensor:
        pooled = [pool(h, None if masks is None else masks[i]) for i, h in enumerate(features)]
        return torch.cat(pooled, dim=1)


def pool(h: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over tokens (``[B, T, D] -> [B, D]``), real tokens only when a mask is given."""
    if h.ndim == 2:
        return h
    if mask is None:
        return h.mean(dim=1)
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class TokenFusion(nn.Module):
    """Transformer fusion over the concatenated tokens of all modalities, read out at a learned
    prediction token (the paper's design, with a dedicated token instead of token 0).

    ``list[B, T_i, D] (or [B, D]) -> [B, D]``. Each modality's tokens get a learned modality
    embedding; padding masks are honoured. ``attention`` picks the encoder's implementation
    (:func:`transformer_stack`).
    """

    def __init__(self, d_model: int, num_modalities: int, heads: int = 5, layers: int = 2, dropout: float = 0.1,
                 attention: Attention = "fast"):
        super().__init__()
        self.pred_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.modality_embed = nn.Parameter(torch.zeros(num_modalities, d_model))
        nn.init.normal_(self.pred_token, std=0.02)
        nn.init.normal_(self.modality_embed, std=0.02)
        self.encoder = transformer_stack(d_model, heads, 4 * d_model, dropout, layers, attention)
        self.attention = attention
        self.norm = nn.LayerNorm(d_model)
        self.out_dim = d_model

    def forward(self, features: list[Tensor], masks: list[Tensor | None] | None = None) -> Tensor:
        tokens, keep = [], []
        batch = features[0].shape[0]
        device = features[0].device
        for i, h in enumerate(features):
            h = h.unsqueeze(1) if h.ndim == 2 else h  # [B, T_i, D]
            tokens.append(h + self.modality_embed[i])
            m = None if masks is None else masks[i]
            keep.append(torch.ones(batch, h.shape[1], dtype=torch.bool, device=device) if m is None else m.bool())
        x = torch.cat([self.pred_token.expand(batch, -1, -1)] + tokens, dim=1)
        keep_all = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=device)] + keep, dim=1)
        if self.attention == "fast":
            # the prediction token is always real, so no sample is all padding; no mask at all
            # when no modality has one (the reference's all-False mask masks nothing)
            pad = None if masks is None or all(m is None for m in masks) else ~keep_all
            # only the prediction token is read out: the last layer computes its query alone
            out = self.encoder(x, pad, all_padded_possible=False, outputs=1)
        else:
            out = self.encoder(x, src_key_padding_mask=~keep_all)
        return self.norm(out[:, 0])


class Head(nn.Module):
    """Prediction head: a residual MLP block then the output layer ``out`` (``[B, D] -> [B, C]``).

    ``out`` is the fused head's last layer whose gradient CGGM compares with the classifiers'.
    """

    def __init__(self, in_dim: int, num_outputs: int, hidden: int | None = None, dropout: float = 0.0):
        super().__init__()
        hidden = hidden or in_dim
        self.proj = nn.Linear(in_dim, hidden)
        self.mlp = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.out = nn.Linear(hidden, num_outputs)

    def forward(self, z: Tensor) -> Tensor:
        h = self.proj(z)
        h = h + self.mlp(h)
        return self.out(torch.relu(h))
