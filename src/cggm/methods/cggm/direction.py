"""CGGM's direction terms (Eq. 9-13): :class:`GradientCosine` (the paper: the cosine of the fused
head's and each classifier's last-layer *gradients*, in the same step) and :class:`WeightCosine`
(the official code: the cosine of their *weights*, one step late; cggm-spec.md A1, A2).

Each term gives ``L_gm`` for the step (or None) and is a state item: what it keeps (the official
term's stale weights) moves only when the step is taken."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn import functional as F

from ... import distributed
from ..binding import UnsupportedSettingError
from ..state import StateItem

if TYPE_CHECKING:
    from .method import CGGM


# -- direction terms -------------------------------------------------------------------------------
class DirectionTerm(StateItem):
    """A direction term of CGGM (Eq. 12-13): ``loss(...)`` gives L_gm for this step (or None);
    ``step_taken``/``step_dropped`` move state that must move only when a step is taken.
    ``clf_loss`` is the sum of the classifiers' losses of this step (its graph starts at the
    detached features, so it reaches only the classifiers)."""

    name = "off"

    def loss(self, cggm: CGGM, task_loss: Tensor, B: Tensor, clf_loss: Tensor) -> tuple[Tensor, Tensor] | None:
        raise NotImplementedError

    def step_taken(self, micro_batches: int, scaler: Any = None) -> None:
        pass

    def step_dropped(self) -> None:
        pass

    # (a part's own state: CGGM declares the term with add_state and the base saves it through this)
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class GradientCosine(DirectionTerm):
    """Eq. 12 on gradients, in the same step (the paper): cos(dL_task/dW_F, dL_i/dW_fi).

    Under fp16 (autocast to float16, or a float16 head) g_F is taken as ``grad(task_loss, W_F,
    grad_outputs=k) / k`` with ``k`` a power of two that brings |k g_F| to about 2^8: see
    :func:`_fp16_seed`. ``rescale``: ``None`` (default) does this under fp16 only; ``True``
    always, ``False`` never. Scaling by a power of two is exact in floating point, so the value of
    g_F and the gradient of L_gm are those of Eq. 12 either way.
    """

    name = "gradient"

    def __init__(self, rescale: bool | None = None) -> None:
        self.rescale = rescale

    def loss(self, cggm, task_loss, B, clf_loss):
        W_F = cggm.head_layer.weight
        last = [clf.last.weight for clf in cggm.classifiers]
        # g_F with its graph (so L_gm reaches the head, the fusion and the encoders) and each
        # classifier's g_i as a constant: two calls, since a graph of the g_i (create_graph in a
        # single call) costs more than the second call (measured on the MLP model: 262 us for one
        # call against 96 + 126 us for two)
        rescale = self.rescale if self.rescale is not None else _fp16_graph(W_F)
        seed = _fp16_seed(task_loss, W_F) if rescale else None
        (g_F,) = torch.autograd.grad(task_loss, W_F, grad_outputs=seed, create_graph=True, retain_graph=True,
                                     allow_unused=True)
        if g_F is not None and seed is not None:
            g_F = g_F / seed  # (exact: a power of two), in fp32, after the fp16 part of g_F's graph
        if g_F is None:
            raise UnsupportedSettingError(
                "CGGM's direction term needs the gradient of the task loss with respect to the fused head's last "
                "layer, but the loss does not depend on it: pass head_layer=... (the layer that produces the "
                "prediction), or direction='off'.")
        grads = torch.autograd.grad(clf_loss, last, retain_graph=True, allow_unused=True)
        g_i = [torch.zeros_like(w) if g is None else g for w, g in zip(last, grads)]
        # under DDP: the global batch's g_F (differentiable) and g_i on every rank (identity in one process)
        g_F = distributed.mean_over_ranks(g_F)
        if distributed.is_distributed():
            g_i = _mean_over_ranks(g_i)
        G = torch.stack([g.reshape(-1) for g in g_i]).to(g_F.dtype)
        cos = F.cosine_similarity(g_F.reshape(1, -1), G, dim=1)
        return gradient_modulation_loss(B.to(cos.dtype), cos), cos


def _fp16_graph(W_F: Tensor) -> bool:
    """Whether g_F's graph runs in float16: autocast to float16 on W_F's device, or a float16 head."""
    device_type = W_F.device.type
    try:
        autocast_fp16 = (torch.is_autocast_enabled(device_type)
                         and torch.get_autocast_dtype(device_type) == torch.float16)
    except RuntimeError:  # a device type autocast does not know
        autocast_fp16 = False
    return autocast_fp16 or W_F.dtype == torch.float16


_FP16_SEED_LOG2 = 8.0  # |k g_F| ~ 2^8: 2^8 below fp16's range forward, the backward 2^8 smaller


def _fp16_seed(task_loss: Tensor, W_F: Tensor) -> Tensor | None:
    """The seed ``k`` (a power of two, 0-d, on the device: no sync) of the differentiable g_F under fp16.

    Why: the gradient of L_gm with respect to g_F is ``lam B (g_i/|g_i| - cos g_F/|g_F|) / (M |g_F|)``,
    times the GradScaler's scale S. In the double backward it meets the fp16 matmul that made g_F
    from the head's input h and the fp16 gradient at the head's output (dL/dz): the gradient of
    dL/dz, ``h @ dL_gm/dg_F``, is about ``S lam |B| |h| / (M |g_F|)`` and overflows fp16 as the
    model fits (|g_F| -> 0): measured on the synthetic MLP, it is the first tensor to turn inf, with
    |g_F| = 0.3 and S = 65536 already (benchmarks/fp16_scale.py). With the seed k, that fp16 part
    of the graph computes k g_F forward and receives dL_gm/dg_F / k backward, and ``g_F = grad / k``
    puts the k back in fp32; the k multiplies back in at the task loss's backward, which autocast
    runs in fp32. So the fp16 tensors see |k g_F| ~ 2^8 forward and ~ S lam |B| |h| / (2^8 M)
    backward, whatever |g_F| is (with |k g_F| ~ 1 the backward still overflowed, S = 65536).

    k comes from a first, graph-free gradient of the head's last layer (a backward through the loss
    and that layer only), rounded to a power of two (exact scaling) and bounded to 2^[-64, 64]."""
    (g,) = torch.autograd.grad(task_loss, W_F, retain_graph=True, allow_unused=True)
    if g is None:
        return None
    norm = g.detach().float().norm()
    exponent = torch.round(_FP16_SEED_LOG2 - torch.log2(norm.clamp_min(2.0**-64))).clamp(-64.0, 64.0)
    return torch.exp2(exponent).to(task_loss.dtype).reshape(task_loss.shape)


class WeightCosine(DirectionTerm):
    """The official code's L_gm (cggm-spec.md A1, A2): cosines of the head's and classifiers'
    last-layer *weights* from step t-1, added at step t, with B / rho; moves only W_F."""

    name = "weight"

    def __init__(self) -> None:
        self.stale: tuple[Tensor, list[Tensor], Tensor] | None = None  # W_F, W_fi, B / rho of the last step
        self._staged: tuple[Tensor, list[Tensor], Tensor] | None = None

    def loss(self, cggm, task_loss, B, clf_loss):
        W_F = cggm.head_layer.weight
        result = None
        if self.stale is not None:
            stale_head, stale_clf, b = self.stale
            # the value of the stale weights, the gradient flowing to the live parameter W_F
            head = W_F + (stale_head.to(W_F.device) - W_F.detach())
            cos = torch.stack([F.cosine_similarity(head.flatten(), w.flatten().to(head.dtype), dim=0)
                               for w in stale_clf])
            result = gradient_modulation_loss(b.to(cos.dtype), cos), cos
        # this step's weights (the classifiers before their update), used at the next step
        self._staged = (W_F.detach().clone(), [clf.last.weight.detach().clone() for clf in cggm.classifiers],
                        (B / cggm.rule.rho).detach())
        return result

    def step_taken(self, micro_batches: int, scaler: Any = None) -> None:
        if self._staged is not None:
            self.stale, self._staged = self._staged, None

    def step_dropped(self) -> None:
        self._staged = None

    # (a part's own state: CGGM declares the term with add_state and the base saves it through this)
    def state_dict(self):
        return {"stale": self.stale}

    def load_state_dict(self, state):
        self.stale = state.get("stale")


DIRECTIONS = {"gradient": GradientCosine, "weight": WeightCosine}


def gradient_modulation_loss(B: Tensor, cos: Tensor) -> Tensor:
    """Eq. 12: ``(1/M) sum_i (|B_i| - B_i cos_i)``; B is a constant here."""
    B = B.detach()
    return (B.abs() - B * cos).mean()


def _mean_over_ranks(grads: list[Tensor | None]) -> list[Tensor | None]:
    """The mean over DDP ranks of a list of gradients, in one flat collective."""
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    flat = distributed.all_reduce_sum(torch.cat([g.reshape(-1) for g in present])) / distributed.world_size()
    out, offset = [], 0
    for g in grads:
        if g is None:
            out.append(None)
            continue
        out.append(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()
    return out
