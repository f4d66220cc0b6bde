"""A faster pre-LN transformer encoder with the parameters of ``nn.TransformerEncoderLayer``.

:class:`FastEncoderLayer` subclasses ``nn.TransformerEncoderLayer(batch_first=True, norm_first=True,
activation=relu)`` and only replaces ``forward``: the parameters, their names, shapes and
initialisation are torch's, so state_dicts load both ways and a model built with the same seed has
the same weights. :class:`FastEncoder` stacks deep copies of one layer under ``layers`` like
``nn.TransformerEncoder`` (whose state_dict keys it shares).

It computes the same function (eval mode equal within float tolerance, training without dropout
equal in outputs and gradients) and trains with the same dropout distribution, about 2x faster
than the reference for the MOSI model's training step on CPU (``benchmarks/backbone.py``). Where
the reference spends its time and what is done instead:

* Dropout masks (CPU). ``nn.Dropout`` draws one Bernoulli per element (``bernoulli_``, slow on
  CPU) and the attention probabilities ``[B, H, T, T]`` are the largest tensors of the model. Here
  64 random bits are split into four 16-bit lanes, one per element, and an element is dropped when
  its lane is below ``round(p * 2**16)``: independent Bernoulli drops with p quantised to 1/65536
  (``|p_used - p| <= 2**-17``, 7.6e-6). The 1/(1-p) rescaling goes into the next matmul's
  ``alpha`` or the residual add's ``value`` (``addcmul``) instead of a pass over the tensor. On
  other devices torch's fused dropout kernels are used (``F.dropout``, SDPA's in-kernel dropout):
  :data:`LANE_DROPOUT_DEVICES`.
* Attention with a padding mask. ``nn.MultiheadAttention`` with a key padding mask (every layer of
  the paper's models) runs SDPA's math path when training with attention dropout: bmm, the "safe"
  softmax's checks of fully masked rows (isneginf, all, where), a float mask rebuilt per layer.
  Here the additive key mask is built once per stack (a large finite negative instead of -inf)
  and enters the QK^T matmul as one more feature (``[q, 1] . [k; bias]``), so no pass adds it;
  the softmax and the dropout mask are one autograd node. Without dropout (eval, or p = 0), and
  off CPU, the attention is ``F.scaled_dot_product_attention`` with the same additive mask (a
  fused kernel). No row is ever fully masked: a sample whose keys are all padding attends
  uniformly and its values are zeroed, so its attention output and the gradients through it are
  zero, what the reference's safe softmax gives for such rows (torch's own inference fast path,
  with an even head count and no grad, gives NaN there instead).
* ReLU and the feed-forward dropout are one autograd node whose backward is one
  ``threshold_backward``.
* A stack asked for its first tokens only (``FastEncoder(..., outputs=1)``: the fusion reads out
  its prediction token) computes the last layer's attention and feed-forward for those queries
  only; every token is still a key and value, so the outputs are the same.

Dropout uses torch's default generator for the device, so ``torch.manual_seed`` makes a run
repeatable; the masks differ from ``nn.Dropout``'s (another draw from the same distribution).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["FastEncoder", "FastEncoderLayer", "dropout_keep", "fast_dropout", "padding_bias"]

_LANES = 65536  # 16-bit lanes

# devices whose dropout uses the 16-bit lanes (cheap on CPU, where torch's Bernoulli sampling is
# slow); elsewhere torch's fused dropout kernels (F.dropout, SDPA's in-kernel dropout) are used
LANE_DROPOUT_DEVICES: tuple[str, ...] = ("cpu",)


def _lanes(t: Tensor) -> bool:
    return t.device.type in LANE_DROPOUT_DEVICES


def _drop_threshold(p: float) -> int:
    """Elements whose signed 16-bit lane is below this are dropped (probability round(p*2^16)/2^16)."""
    return -32768 + int(round(p * _LANES))


def dropout_keep(shape: tuple[int, ...], p: float, like: Tensor) -> Tensor:
    """A ``shape`` tensor of ``like``'s dtype and device: 0 (dropped, probability p) or 1 (kept),
    independently per element, from 16 random bits per element."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device).random_(-(2**63), None)
    lanes = words.view(torch.int16)[:n].view(shape)
    return torch.ge(lanes, _drop_threshold(p), out=torch.empty(shape, dtype=like.dtype, device=like.device))


def fast_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)``, with :func:`dropout_keep`'s masks on CPU."""
    if not training or p == 0.0:
        return x
    if p >= 1.0 or p < 0.0 or not _lanes(x):
        return F.dropout(x, p, training)  # all dropped (or torch's error for p < 0)
    return x * dropout_keep(tuple(x.shape), p, x).mul_(1.0 / (1.0 - p))


class _ReluKeep(torch.autograd.Function):
    """``relu(h) * keep`` (keep of 0/1) in one node; the backward is ``grad * (out > 0)``."""

    @staticmethod
    def forward(ctx, h: Tensor, keep: Tensor) -> Tensor:
        out = torch.relu(h).mul_(keep)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, out, 0), None


class _SoftmaxKeep(torch.autograd.Function):
    """``softmax(s, -1) * keep`` (keep of 0/1); saves the softmax and the mask, and the backward
    multiplies the incoming gradient by the mask in place before the fused softmax backward."""

    @staticmethod
    def forward(ctx, s: Tensor, keep: Tensor) -> Tensor:
        probs = torch.softmax(s, dim=-1)
        ctx.save_for_backward(probs, keep)
        return probs * keep

    @staticmethod
    def backward(ctx, grad: Tensor):
        probs, keep = ctx.saved_tensors
        # the incoming gradient is the fresh output of the next bmm's backward: masked in place
        # unless a graph of the backward is being built (create_graph)
        grad = grad * keep if torch.is_grad_enabled() else grad.mul_(keep)
        return torch._softmax_backward_data(grad, probs, -1, probs.dtype), None


def _mask_value(dtype: torch.dtype) -> float:
    """A finite stand-in for -inf on padded keys: exp(score + it - max) is exactly 0, and it never
    meets a 0 in a matmul (no NaN in any gradient)."""
    return -min(1e30, torch.finfo(dtype).max / 2)


def _bias_as(key_bias: Tensor, dtype: torch.dtype) -> Tensor:
    """The key bias in ``dtype``, its mask value still finite there (e.g. under fp16 autocast)."""
    if key_bias.dtype == dtype:
        return key_bias
    return key_bias.clamp_min(_mask_value(dtype)).to(dtype)


def padding_bias(keep: Tensor | None, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """From a ``[B, T]`` mask (True on real tokens): the additive key bias ``[B, T]`` (0 on real
    keys, :func:`_mask_value` on padded ones; 0 everywhere for a sample with no real key) and the
    ``[B]`` factor (0 for a sample with no real key, 1 otherwise) that zeroes such a sample's
    values. ``(None, None)`` without a mask."""
    if keep is None:
        return None, None
    keep = keep.bool()
    any_real = keep.any(dim=1, keepdim=True)  # [B, 1]
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep & any_real, _mask_value(dtype))
    return bias, any_real.squeeze(1).to(dtype)


class FastEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True,
    norm_first=True)`` with a faster forward (see the module docstring).

    ``forward(x, key_bias, value_keep)`` takes the outputs of :func:`padding_bias` instead of a key
    padding mask, so a stack builds them once.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 layer_norm_eps: float = 1e-5, device=None, dtype=None):
        super().__init__(d_model, nhead, dim_feedforward=dim_feedforward, dropout=dropout,
                         layer_norm_eps=layer_norm_eps, batch_first=True, norm_first=True, device=device, dtype=dtype)

    def forward(self, x: Tensor, key_bias: Tensor | None = None,  # type: ignore[override]
                value_keep: Tensor | None = None, queries: int | None = None) -> Tensor:
        """``x`` ``[B, T, D]`` -> ``[B, T, D]``, or with ``queries=n`` only the first ``n`` tokens'
        outputs ``[B, n, D]`` (every token is still a key and value)."""
        train = self.training
        attn = self.self_attn
        p_attn = float(attn.dropout) if train else 0.0
        out, alpha = self._attention(self.norm1(x), key_bias, value_keep, p_attn, queries)
        if queries is not None:
            x = x[:, :queries]
        out = torch.addmm(attn.out_proj.bias, out, attn.out_proj.weight.t(), alpha=alpha).view(x.shape)
        x = _residual_dropout(x, out, self.dropout1.p if train else 0.0)

        # feed-forward: linear2(dropout(relu(linear1(norm2(x))))), its dropout's 1/(1-p) in addmm's alpha
        h = F.linear(self.norm2(x), self.linear1.weight, self.linear1.bias).flatten(0, 1)
        p_ff = self.dropout.p if train else 0.0
        if 0.0 < p_ff < 1.0 and _lanes(h):
            h, alpha = _ReluKeep.apply(h, dropout_keep(tuple(h.shape), p_ff, h)), 1.0 / (1.0 - p_ff)
        else:
            h, alpha = fast_dropout(torch.relu(h), p_ff, train), 1.0
        out = torch.addmm(self.linear2.bias, h, self.linear2.weight.t(), alpha=alpha).view(x.shape)
        return _residual_dropout(x, out, self.dropout2.p if train else 0.0)

    def _attention(self, h: Tensor, key_bias: Tensor | None, value_keep: Tensor | None, p: float,
                   queries: int | None) -> tuple[Tensor, float]:
        """Multi-head self-attention of ``h`` ``[B, T, D]`` (queries: the first ``queries`` tokens,
        or all) before the output projection: ``[B*Tq, D]``, and the factor (1/(1-p) with
        dropout) the projection's matmul must apply."""
        B, T, D = h.shape
        Tq = T if queries is None else queries
        attn = self.self_attn
        H = attn.num_heads
        hd = D // H
        q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).view(B, T, 3, H, hd).unbind(2)
        q = q[:, :Tq].transpose(1, 2)  # [B, H, Tq, hd]
        v = v.transpose(1, 2)  # [B, H, T, hd]
        if value_keep is not None:
            v = v * value_keep.to(v.dtype).view(B, 1, 1, 1)
        if not (0.0 < p < 1.0 and _lanes(h)):
            # without dropout, or off CPU: SDPA with the additive mask (a fused kernel where
            # available; on GPUs with its in-kernel dropout)
            mask = None if key_bias is None else _bias_as(key_bias, h.dtype).view(B, 1, 1, T)
            out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v, attn_mask=mask, dropout_p=p)
            return out.transpose(1, 2).reshape(B * Tq, D), 1.0
        q = q * (1.0 / math.sqrt(hd))
        k_t = k.permute(0, 2, 3, 1)  # [B, H, hd, T]
        if key_bias is not None:
            # the key bias as one more feature: [q, 1] . [k; bias] = q . k + bias, inside the matmul
            q = torch.cat([q, q.new_ones(1, 1, 1, 1).expand(B, H, Tq, 1)], dim=3)
            k_t = torch.cat([k_t, _bias_as(key_bias, k_t.dtype).view(B, 1, 1, T).expand(B, H, 1, T)], dim=2)
        scores = torch.bmm(q.reshape(B * H, Tq, -1), k_t.reshape(B * H, -1, T))  # [B*H, Tq, T]
        probs = _SoftmaxKeep.apply(scores, dropout_keep(tuple(scores.shape), p, scores))
        out = torch.bmm(probs, v.reshape(B * H, T, hd))
        return out.view(B, H, Tq, hd).transpose(1, 2).reshape(B * Tq, D), 1.0 / (1.0 - p)


def _residual_dropout(x: Tensor, out: Tensor, p: float) -> Tensor:
    """``x + dropout(out, p)`` in one op (the mask and 1/(1-p) inside ``addcmul``)."""
    if 0.0 < p < 1.0 and _lanes(out):
        return torch.addcmul(x, out, dropout_keep(tuple(out.shape), p, out), value=1.0 / (1.0 - p))
    return x + fast_dropout(out, p)


class FastEncoder(nn.Module):
    """A stack of ``num_layers`` deep copies of ``layer`` (as ``nn.TransformerEncoder`` builds it, so
    the layers start equal and the state_dict keys are ``layers.<i>.*``), no final norm.

    ``forward(x, src_key_padding_mask)`` takes ``nn.TransformerEncoder``'s convention: True on
    PADDED tokens."""

    def __init__(self, layer: FastEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        self.num_layers = num_layers

    def forward(self, x: Tensor, src_key_padding_mask: Tensor | None = None, *,
                all_padded_possible: bool = True, outputs: int | None = None) -> Tensor:
        """``all_padded_possible=False`` skips the zeroing of samples with no real token (for a
        caller that knows every sample has one, like a fusion with an always-real prediction
        token). ``outputs=n`` returns only the first ``n`` tokens ``[B, n, D]``: the last layer then
        computes only their queries (equal to the full stack's ``[:, :n]``)."""
        key_bias, value_keep = (None, None) if src_key_padding_mask is None else padding_bias(
            ~src_key_padding_mask.bool(), x.dtype)
        if not all_padded_possible:
            value_keep = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, key_bias, value_keep, outputs if i == last else None)
        return x if outputs is None or not self.layers else x[:, :outputs]
