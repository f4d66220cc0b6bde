"""The few collective operations methods need so every rank applies the same statistics.

Everything is a no-op in a single process, so methods call these unconditionally.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over ranks (a new tensor; the input is left as it is)."""
    if not is_distributed():
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def weighted_mean(values: Tensor, weight: Tensor | float) -> Tensor:
    """The mean over ranks of ``values`` (a local mean over ``weight`` samples), weighted by sample count."""
    if not is_distributed():
        return values
    if isinstance(weight, Tensor):
        w = weight.to(dtype=values.dtype, device=values.device).reshape(1)
    else:  # a fill on the device, not a host-to-device copy
        w = torch.full((1,), float(weight), dtype=values.dtype, device=values.device)
    packed = torch.cat([values.reshape(-1) * w, w])
    packed = all_reduce_sum(packed)
    return (packed[:-1] / packed[-1]).reshape(values.shape)


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of parameters that DDP does not manage (e.g. a method's own
    auxiliary modules), in one flat collective."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset: offset + n].view_as(g))
        offset += n


def broadcast_object(obj):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _MeanOverRanks(torch.autograd.Function):
    """``mean_r x_r`` with a backward that keeps the sum of every rank's loss correct: each rank's
    loss depends on the mean through all ranks' inputs, so the incoming gradients are summed over
    ranks (and divided by the world size, the mean's factor)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / world_size()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad / world_size()


def mean_over_ranks(t: Tensor) -> Tensor:
    """The mean over ranks of ``t``, differentiable (e.g. a gradient taken with ``create_graph=True``
    on a rank's local loss, so every rank uses the gradient of the global batch's loss). With DDP
    averaging the parameter gradients, a loss built on this mean gets the same gradient as in one
    process with the global batch. Identity in a single process."""
    if not is_distributed():
        return t
    return _MeanOverRanks.apply(t)
