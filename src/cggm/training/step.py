"""The one training step: the engine (:class:`~cggm.training.Trainer`), the Lightning module and a
user's own loop all run a step here, so each effect is on one visible line, once::

    method.reset_records()
    inputs, masks = method.prepare(inputs, masks)
    out = forward(inputs, masks)
    loss = method.loss(out, target, task.loss(out.prediction, target))
    optimizer.zero_grad(set_to_none=True)
    backward(loss)                     # method.backward(scaler.scale(loss)): B, noise, ... are in the gradients
    norm = clip or measure             # after unscaling under fp16: clipping sees the true gradients
    finite = loss (and norm) finite    # one host synchronisation, the same decision on every rank
    method.step(optimizer, scaler=scaler) or method.skip()
    scaler.update()

A non-finite loss (or, without a GradScaler, a non-finite gradient norm) is a diverging step: it is
skipped (``on_nonfinite="skip"``: nothing moves, the method's staged state is dropped) or stops
training with :class:`NonFiniteError`. With a GradScaler, non-finite *gradients* are the scaler's
ordinary overflow: it skips the step and lowers its scale, and training goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import distributed


class NonFiniteError(RuntimeError):
    """A training step produced a NaN or inf loss or gradient norm (``on_nonfinite="stop"``)."""


@dataclass
class StepResult:
    """What a step did: ``loss`` (the global batch's, detached), ``taken`` (the optimizer step ran),
    ``skipped`` (a non-finite step skipped by ``on_nonfinite="skip"``) and ``message`` (why)."""

    loss: Tensor
    taken: bool
    skipped: bool = False
    message: str = ""


def train_step(method, optimizer: Any, batch, *, forward: Callable | None = None, scaler: Any = None,
               clip_grad_norm: float | None = None, backward: Callable[[Tensor], None] | None = None,
               step_optimizer: Any = None, on_nonfinite: str = "stop", where: str = "") -> StepResult:
    """One training step of ``method`` (bound to its model) on ``batch`` = ``(inputs, masks, target)``.

    forward: the model's forward (default the bound model; a DDP wrapper in the engine).
    scaler: a ``torch.amp.GradScaler`` (fp16): the loss is scaled, the gradients unscaled before
        clipping, and the step (and the method's own optimizers) go through it.
    backward: runs the backward pass of the loss (default ``method.backward`` of the scaled loss;
        Lightning passes its ``manual_backward``, which scales and then calls ``method.backward``).
    step_optimizer: what ``method.step`` steps (default ``optimizer``; a wrapper or a step function).
    """
    inputs, masks, target = batch
    method.reset_records()
    inputs, masks = method.prepare(inputs, masks)
    out = (forward or method.model)(inputs, masks)
    loss = method.loss(out, target, method.task.loss(out.prediction, target))
    optimizer.zero_grad(set_to_none=True)
    if backward is not None:
        backward(loss)
    else:
        method.backward(scaler.scale(loss) if scaler is not None else loss)
    inner = getattr(optimizer, "optimizer", optimizer)
    if scaler is not None and clip_grad_norm is not None:
        scaler.unscale_(inner)  # clip the true gradients (GradScaler.step does not unscale twice)
    checks = [loss.detach().float().reshape(())]
    if scaler is None:  # (under fp16 an overflowing gradient is the scaler's to skip, not divergence)
        checks.append(_clip_or_norm(method._model_params, clip_grad_norm, loss))
    elif clip_grad_norm is not None:
        _clip_or_norm(method._model_params, clip_grad_norm, loss)
    check = torch.stack(checks)
    if distributed.world_size() > 1:
        check = distributed.all_reduce_sum(check) / distributed.world_size()
    if not bool(torch.isfinite(check).all()):  # the one host synchronisation of a step
        method.skip()
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and clip_grad_norm is not None:
            scaler.update()  # (unscale_ ran: the scaler must close this step before the next one)
        message = f"step {method.global_step}{where}: " + ", ".join(
            f"{n}={float(v):.4g}" for n, v in zip(("loss", "gradient norm"), check))
        if on_nonfinite != "skip":
            raise NonFiniteError(f"Training diverged at {message}.")
        return StepResult(check[0], taken=False, skipped=True, message=message)
    taken = method.step(step_optimizer if step_optimizer is not None else optimizer, scaler=scaler)
    if scaler is not None:
        scaler.update()
    return StepResult(check[0], taken=taken)


def _clip_or_norm(params: list[torch.nn.Parameter], clip: float | None, loss: Tensor) -> Tensor:
    """The gradients' global norm (clipped to ``clip`` if given)."""
    if clip is not None:
        return torch.nn.utils.clip_grad_norm_(params, clip).float()
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return loss.new_zeros(()).float()
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).float()
