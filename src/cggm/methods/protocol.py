"""The step protocol: the public phases of a training step and their checks, written once.

A training step, in the engine, the Lightning module and a user's own loop::

    inputs, masks = method.prepare(inputs, masks)          # 1. inputs (e.g. modality dropout)
    out = model(inputs, masks)                             #    ModelOutput: prediction + features
    loss = method.loss(out, target, task.loss(out.prediction, target))   # 2. the loss
    optimizer.zero_grad(set_to_none=True)
    method.backward(loss)                                  # 3. gradients (and a method's edits)
    # (clip gradients here if you want to: B and every other gradient edit are already in them)
    method.step(optimizer)                                 # 4. the update; or step(optimizer, scaler=scaler)

and, for methods that declare epoch hooks, ``method.begin_epoch(ctx)`` / ``method.finish_epoch(ctx)``.
What each phase may do, so that a skipped or accumulated step is never wrong: :meth:`loss`
computes and *stages* (:meth:`stage`), never steps or advances a statistic; :meth:`backward`
back-propagates outside autocast and applies gradient edits before the caller clips; :meth:`step`
takes the optimizer step and then *commits* (the declared state items step, the method's
``on_step_taken`` sees the micro-batches' staged values); :meth:`skip` drops what was staged and
leaves the method's state exactly as it was. A loop that bypasses a phase, or skips what the
method declared it needs, gets a :class:`ProtocolError` naming the fix.

These phases are machinery: a method never overrides them (:class:`cggm.methods.base.Method`
refuses a subclass that does); it writes the hooks they call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..types import ModelOutput

StepFunction = Callable[[], Any]
PHASES = ("prepare", "prepare_eval", "loss", "backward", "step", "skip", "begin_epoch", "finish_epoch")


class ProtocolError(RuntimeError):
    """The training step bypassed a phase of the method protocol (see :mod:`cggm.methods.protocol`),
    so the method's modulation would silently not be applied."""


class StepProtocol:
    """The phases (see the module docstring); mixed into :class:`cggm.methods.base.Method`."""

    def _begin_protocol(self) -> None:
        self.global_step = 0  # optimizer steps taken (skipped steps do not count)
        self.epoch = 0
        self._epochs_started = 0
        self._n_losses = 0  # loss() calls since the last step() / skip()
        self._n_backwards = 0
        self._version_mark = 0
        self._feature_hooks: list[tuple[str, list[bool]]] = []
        self._stage_values: dict[str, list[Any]] = {}
        self._checked_optimizers: set[int] = set()
        self._step_scaler: Any = None

    # -- inputs ------------------------------------------------------------------------------------
    def prepare(self, inputs: dict[str, Tensor], masks: dict[str, Tensor]) -> tuple[dict, dict]:
        """A training batch's inputs and masks, as the method transforms them before the forward pass."""
        return self.transform_batch(inputs, masks, training=True)

    def prepare_eval(self, inputs: dict[str, Tensor], masks: dict[str, Tensor]) -> tuple[dict, dict]:
        """An evaluation batch's inputs and masks, as the method transforms them."""
        return self.transform_batch(inputs, masks, training=False)

    # -- the step ----------------------------------------------------------------------------------
    def loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        """The loss to back-propagate for this (micro-)batch. Stages, never commits."""
        self._require_bound("loss")
        if not isinstance(out, ModelOutput):
            raise TypeError(
                f"{self.name}.loss() needs a cggm.ModelOutput, got a {type(out).__name__}. Wrap what your model "
                f"returns: ModelOutput(prediction, features), with features the per-modality tensors the fusion consumed.")
        if len(out.features) != len(self.modalities):
            raise ValueError(f"{self.name} was bound to {len(self.modalities)} modalities {list(self.modalities)} but "
                             f"the model returned {len(out.features)} feature tensors.")
        if self._n_losses and self._parameter_version() != self._version_mark:
            raise ProtocolError(
                f"The model's parameters changed since the last {self.name}.loss() without {self.name}.step(): "
                f"the optimizer was stepped directly (optimizer.step() or scaler.step(optimizer)), so the "
                f"method's update (its modulation, its classifiers or heads, its statistics) was not applied. "
                f"Step through the method: method.step(optimizer), or method.step(optimizer, scaler=scaler).")
        if not self._n_losses:
            self._records.clear()
        result = self.compute_loss(out, target, task_loss)
        self._n_losses += 1
        self._version_mark = self._parameter_version()
        return result

    def backward(self, loss: Tensor) -> None:
        """Back-propagate ``loss`` and apply the method's gradient edits, before the caller clips."""
        self._require_bound("backward")
        if not self._n_losses:
            raise ProtocolError(f"{self.name}.backward() was called without {self.name}.loss() for this step.")
        if self.support.edits_gradients and not self.support.accumulates and self._n_losses > 1:
            raise ProtocolError(
                f"{self.name} edits the gradients after each backward pass, which under gradient accumulation "
                f"would edit the earlier micro-batches' gradients again; take one optimizer step per batch.")
        # (outside autocast, as torch recommends: on CPU the backward runs on this thread, where an
        # enclosing autocast, e.g. Lightning's, would cast fp32 modules' backward ops to half precision)
        with no_autocast(loss.device.type):
            self.compute_gradients(loss)
        self.edit_gradients()
        self._n_backwards += 1

    def step(self, optimizer: Any, *, scaler: Any = None) -> bool:
        """Take the optimizer step (a ``torch.optim.Optimizer``, a wrapper that keeps one in
        ``.optimizer``, or a function that takes the step and may return ``False`` for skipped)
        through ``scaler`` if given, then commit the staged state; returns whether it was taken.
        The method's own optimizers step through the scaler too, before you call ``scaler.update()``."""
        self._require_bound("step")
        if not self._n_losses:
            raise ProtocolError(f"{self.name}.step() was called without {self.name}.loss() since the last step.")
        if self.support.edits_gradients and self._n_backwards < self._n_losses:
            raise ProtocolError(
                f"{self.name} edits gradients after the backward pass (or computes them itself), but the "
                f"backward pass did not go through it: call method.backward(loss) instead of loss.backward().")
        self._check_feature_hooks()
        self._check_loop(optimizer)
        inner = _innermost(optimizer) if isinstance(optimizer, torch.optim.Optimizer) else None
        if inner is not None and inner is not self.optimizer:
            self.set_optimizer(inner)  # (the optimizer actually stepped; CGGM checks its choice of where B acts)
        self._step_scaler = scaler
        taken = bool(self.wrap_optimizer_step(_step_function(optimizer, scaler)))
        if taken:
            for item in self._state_items():
                item.step_taken(self._n_losses, scaler)
            self.on_step_taken()
            self.global_step += 1
        self._end_step(taken)
        return taken

    def skip(self) -> None:
        """The caller does not take this step (e.g. a non-finite loss): drop what :meth:`loss`
        staged, leaving the method's state exactly as before the step."""
        self._end_step(False)

    def begin_epoch(self, ctx: Any) -> None:
        """Tell the method an epoch starts (``ctx``: an :class:`~cggm.methods.base.EpochContext`)."""
        self.epoch = ctx.epoch
        self._epochs_started += 1
        self.on_epoch_start(ctx)

    def finish_epoch(self, ctx: Any) -> None:
        """Tell the method an epoch ended (``ctx.metrics``: the epoch's validation metrics, if any)."""
        self.on_epoch_end(ctx)

    # -- staging -------------------------------------------------------------------------------------
    def stage(self, name: str, value: Any) -> None:
        """Keep ``value`` (a tensor or a list of tensors) for this step's :meth:`on_step_taken`; one per
        micro-batch, dropped if the step is skipped."""
        self._stage_values.setdefault(name, []).append(value)

    def staged(self, name: str, default: Any = None, *, all: bool = False) -> Any:
        """The mean over this step's micro-batches of what was staged as ``name`` (the value itself
        for one micro-batch; element-wise for lists), or ``default`` if nothing was; ``all=True``:
        the list of the micro-batches' values."""
        values = self._stage_values.get(name)
        if all:
            return list(values or [])
        if not values:
            return default
        if len(values) == 1:
            return values[0]
        if isinstance(values[0], (list, tuple)):
            return [torch.stack(v).mean(0) for v in zip(*values)]
        return torch.stack(values).mean(0)

    @property
    def micro_batch(self) -> int:
        """How many losses of this step came before the current one (0 for the first)."""
        return self._n_losses

    # -- internals -----------------------------------------------------------------------------------
    def _require_bound(self, phase: str) -> None:
        if self.model is None:
            raise ProtocolError(f"{self.name}.{phase}() was called before bind(): call "
                                f"method.bind(model, task, modalities=[...]) first.")

    def _parameter_version(self) -> int:
        # in-place updates (every optimizer's step) bump a tensor's version counter: a host integer
        return sum(p._version for p in self._model_params)

    def _check_feature_hooks(self) -> None:
        dead = [m for m, fired in self._feature_hooks if not fired[0]]
        if dead:
            raise ProtocolError(
                f"{self.name} scales the gradient flowing into the encoder of {dead} through the feature tensors "
                f"the model returned, but no gradient flowed through them: the prediction was not computed from "
                f"these tensors (a copy, a pooled or re-projected view?), so the modulation would silently do "
                f"nothing. Return in ModelOutput.features exactly the tensors the fusion consumed"
                + (", or scale updates instead (scale_on='update')." if self.name.startswith("cggm") else "."))

    def _check_loop(self, optimizer: Any) -> None:
        """What the method declared it needs from the loop: its epoch hooks, its parameter groups."""
        if self.support.epoch_hooks and not self._epochs_started:
            raise ProtocolError(
                f"{self.name} acts at epoch boundaries (its schedule, statistics or weights change there), but "
                f"method.begin_epoch(ctx) was never called, so it would silently train as joint training. Call "
                f"method.begin_epoch(EpochContext.from_loaders(...)) at each epoch's start and "
                f"method.finish_epoch(...) at its end, or train with cggm.training.Trainer.")
        inner = _innermost(optimizer) if isinstance(optimizer, torch.optim.Optimizer) else None
        if not self.support.param_groups or inner is None or id(inner) in self._checked_optimizers:
            return
        want = [({id(p) for p in g["params"]}, float(g.get("lr_scale", 1.0))) for g in self.param_groups(self.model)]
        have = {frozenset(id(p) for p in g["params"]): g["lr"] for g in inner.param_groups}
        lrs = [have.get(frozenset(ids)) for ids, _ in want]
        ok = all(lr is not None for lr in lrs) and all(
            abs(lr * want[0][1] - lrs[0] * s) <= 1e-9 * max(abs(lr * want[0][1]), 1e-30) for lr, (_, s) in zip(lrs, want))
        if not ok:
            raise ProtocolError(
                f"{self.name} gives parts of the model their own learning rates through its parameter groups, but "
                f"the optimizer was not built from them, so it would silently train as joint training. Build it "
                f"with cggm.optim.build_optimizer('adam', method.param_groups(model), lr=...).")
        self._checked_optimizers.add(id(inner))

    def _end_step(self, taken: bool) -> None:
        if self._n_losses and not taken:
            for item in self._state_items():
                item.step_dropped()
        self._n_losses = 0
        self._n_backwards = 0
        self._feature_hooks = []
        self._stage_values = {}


def no_autocast(device_type: str):
    """A context without autocast on ``device_type`` (a no-op context when autocast is off there)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta): it cannot be on there
        enabled = False
    return torch.autocast(device_type=device_type, enabled=False) if enabled else contextlib.nullcontext()


def _step_function(optimizer, scaler) -> Callable[[], bool]:
    """A function that takes the model's step and returns whether it was taken."""
    if isinstance(optimizer, torch.optim.Optimizer):
        run = (lambda: scaler.step(optimizer)) if scaler is not None else optimizer.step
        return lambda: _observed(optimizer, run)
    if callable(optimizer):
        return lambda: optimizer() is not False
    raise TypeError(f"step() needs an optimizer or a step function, got {type(optimizer).__name__}.")


def _innermost(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer that steps: wrappers (Accelerate's, Lightning's) keep it in ``.optimizer``."""
    seen = 0
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer) and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    return optimizer


def _observed(optimizer: torch.optim.Optimizer, run: Callable[[], Any]) -> bool:
    """Run ``run`` (which steps ``optimizer``) and return whether the underlying step actually ran."""
    ran = [False]

    def hook(*_: Any) -> None:
        ran[0] = True

    handle = _innermost(optimizer).register_step_post_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return ran[0]
