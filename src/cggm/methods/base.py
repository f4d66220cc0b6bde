"""The one interface every balancing method implements.

A training step, in the engine and in a user's own loop, is::

    inputs, masks = method.prepare(inputs, masks)          # e.g. modality dropout
    out = model(inputs, masks)                             # ModelOutput: prediction + features
    loss = method.loss(out, target, task.loss(out.prediction, target))
    optimizer.zero_grad(set_to_none=True)
    method.backward(loss)                                  # usually loss.backward()
    method.step(optimizer)                                 # after_backward + optimizer step

Methods hook in where they need to: :meth:`prepare` (inputs), :meth:`loss` (extra terms, feature
gradient hooks), :meth:`backward` (several backward passes), :meth:`after_backward` (gradient
edits), :meth:`optimizer_step` (update scaling), :meth:`param_groups` (per-modality learning rates),
:meth:`on_epoch_start` / :meth:`on_epoch_end` (epoch statistics, schedules) and
:meth:`eval_prediction` (test-time fusion). The engine never branches on a method's name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import distributed
from ..types import TASK_KINDS, ModelOutput, Task

Batch = tuple[dict[str, Tensor], dict[str, Tensor], Tensor]  # inputs, masks, target


class UnsupportedSettingError(ValueError):
    """A method was asked to run in a setting it does not support."""


@dataclass(frozen=True)
class Support:
    """What a method supports; checked when it is bound to a model."""

    min_modalities: int = 2
    max_modalities: int | None = None
    tasks: tuple[str, ...] = TASK_KINDS
    needs: str = ""  # free text, e.g. "a model with concatenation fusion and a linear head"
    ddp: bool = True  # False: the method's steps leave parts of the model unused, which DDP cannot reduce


@dataclass
class EpochContext:
    """What epoch-level hooks may use. ``batches(split)`` yields ``(inputs, masks, target)`` on
    the model's device, in a fixed order; ``forward`` runs the (possibly DDP-wrapped) model."""

    epoch: int
    epochs: int
    model: nn.Module
    task: Task
    batches: Callable[[str], Iterator[Batch]]
    forward: Callable[..., ModelOutput]
    metrics: dict[str, float] = field(default_factory=dict)


class Method:
    """Base class: joint training (no balancing). Subclasses override only the hooks they need."""

    name: ClassVar[str] = "joint"
    support: ClassVar[Support] = Support()

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.task: Task | None = None
        self.modalities: tuple[str, ...] = ()
        self.global_step = 0
        self.epoch = 0
        self._records: dict[str, Tensor] = {}

    # -- set-up -----------------------------------------------------------------------------
    def bind(self, model: nn.Module, task: Task, modalities: Sequence[str] | None = None) -> Method:
        """Attach the method to a model and task; raises :class:`UnsupportedSettingError` for a
        setting the method does not support."""
        modalities = tuple(modalities if modalities is not None else getattr(model, "modalities", ()))
        self.check_support(len(modalities), task)
        self.model, self.task, self.modalities = model, task, modalities
        self.setup()
        return self

    def check_support(self, num_modalities: int, task: Task) -> None:
        s = self.support
        if num_modalities < s.min_modalities or (s.max_modalities is not None and num_modalities > s.max_modalities):
            hi = "any number" if s.max_modalities is None else str(s.max_modalities)
            raise UnsupportedSettingError(
                f"Method {self.name!r} supports {s.min_modalities} to {hi} modalities, got {num_modalities}."
            )
        if task.kind not in s.tasks:
            raise UnsupportedSettingError(
                f"Method {self.name!r} supports tasks {list(s.tasks)}, not {task.kind!r}."
            )
        if not s.ddp and distributed.is_distributed():
            raise UnsupportedSettingError(
                f"Method {self.name!r} does not run under DDP: its loss leaves the fused head (or, per stage, "
                f"some encoders) without a gradient, which DDP's gradient reduction cannot handle. "
                f"Run it in a single process."
            )

    def setup(self) -> None:
        """Called once by :meth:`bind`, after ``model``, ``task`` and ``modalities`` are set."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Parameter groups for the model's optimizer (a method may give modalities their own lr
        by adding an ``lr_scale`` key to a group)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    # -- the step ----------------------------------------------------------------------------
    def prepare(self, inputs: dict[str, Tensor], masks: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Transform a training batch before the forward pass (default: unchanged)."""
        return inputs, masks

    def prepare_eval(self, inputs: dict[str, Tensor], masks: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Transform an evaluation batch before the forward pass (default: unchanged)."""
        return inputs, masks

    def loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        """The loss to back-propagate (default: the task loss)."""
        return task_loss

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def after_backward(self) -> None:
        """Edit gradients after the backward pass (default: nothing)."""

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``after_backward`` then :meth:`apply_update`."""
        self.after_backward()
        self.apply_update(optimizer)

    def apply_update(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer_step``, then advance the step counter. (The engine calls ``after_backward``,
        then checks and clips the gradients, then this.)"""
        self.optimizer_step(optimizer)
        self.global_step += 1

    # -- epochs and evaluation ------------------------------------------------------------------
    def on_epoch_start(self, ctx: EpochContext) -> None:
        self.epoch = ctx.epoch

    def on_epoch_end(self, ctx: EpochContext) -> None:
        """Epoch-level statistics or schedule changes (default: nothing)."""

    def eval_prediction(self, out: ModelOutput) -> Tensor:
        """The prediction used at evaluation time (default: the fused prediction)."""
        return out.prediction

    def eval_begin(self) -> None:
        """Start accumulating method-specific evaluation metrics (e.g. auxiliary classifiers)."""

    def eval_step(self, out: ModelOutput, target: Tensor) -> None:
        pass

    def eval_end(self) -> dict[str, float]:
        return {}

    # -- observability and state ------------------------------------------------------------------
    def record(self, name: str, value: Tensor) -> None:
        """Keep a per-step scalar (a device tensor; the engine copies records to the host in bulk)."""
        self._records[name] = value.detach()

    def records(self) -> dict[str, Tensor]:
        """The scalars recorded during the last step."""
        return dict(self._records)

    def reset_records(self) -> None:
        """Forget the last step's records (the engine calls this before each step, so a value a
        method records only on some steps is not repeated on the others)."""
        self._records.clear()

    def modules(self) -> Mapping[str, nn.Module]:
        """Modules the method owns (auxiliary heads, classifiers); empty by default."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"global_step": self.global_step, "epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.global_step = int(state.get("global_step", 0))
        self.epoch = int(state.get("epoch", 0))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
