"""The method base: a method is its math; the base keeps the books.

A method declares what it supports and needs (:class:`Support`), the state it keeps
(:meth:`Method.add_state`: values, auxiliary modules, random streams) and writes a few hooks, each a
no-op by default. The phases of a step that call them (``prepare``, ``loss``, ``backward``,
``step``, ``skip``, ``begin_epoch``, ``finish_epoch``; :mod:`cggm.methods.protocol`) are never
overridden; saving, loading, device moves, DDP averaging of auxiliary modules, staging and dropping
a skipped step are done here, once.

The hooks, by when they run:

* set-up: :meth:`setup` (once, at ``bind``), :meth:`param_groups` (the model optimizer's groups);
* the step: :meth:`transform_batch` (inputs, before the forward pass), :meth:`compute_loss` (the
  loss; stage what the step measured with :meth:`stage`), :meth:`compute_gradients` (the backward
  pass), :meth:`edit_gradients` (after it, before clipping), :meth:`wrap_optimizer_step` (around
  the model's optimizer step), :meth:`on_step_taken` (the step was taken: advance statistics from
  :meth:`staged` values);
* epochs: :meth:`on_epoch_start`, :meth:`on_epoch_end`;
* evaluation: :meth:`eval_prediction` (the prediction scored), :meth:`eval_metrics` (the method's
  own metrics, torchmetrics-like objects updated with ``(out, target)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..types import TASK_KINDS, ModelOutput, Task
from . import legacy
from .binding import UnsupportedSettingError, by_modality, check_modalities, check_support, declared_groups
from .protocol import PHASES, ProtocolError, StepProtocol, no_autocast
from .state import StateItem

__all__ = ["EpochContext", "Method", "ProtocolError", "Support", "UnsupportedSettingError", "no_autocast"]
Batch = tuple[dict[str, Tensor], dict[str, Tensor], Tensor]  # inputs, masks, target


@dataclass(frozen=True)
class Support:
    """What a method supports and needs, declared by the class and checked at ``bind`` and each step.

    edits_gradients: its ``compute_gradients``/``edit_gradients`` change what ``backward`` gives
        (``loss.backward()`` is then refused). accumulates: gradient accumulation over micro-batches
        is sound (default: unless it edits gradients). unused_parameters: some steps leave model
        parameters without a gradient (DDP must look for them). epoch_hooks: it acts at epoch
        boundaries (a loop must call ``begin_epoch``). param_groups: the model's optimizer must be
        built from ``param_groups`` (a loop that does not is refused)."""

    min_modalities: int = 2
    max_modalities: int | None = None
    tasks: tuple[str, ...] = TASK_KINDS
    needs: str = ""  # free text, e.g. "a model with concatenation fusion and a linear head"
    ddp: bool = True  # False: the method cannot run under DDP at all
    edits_gradients: bool = False
    accumulates: bool | None = None
    unused_parameters: bool = False
    epoch_hooks: bool = False
    param_groups: bool = False

    def __post_init__(self) -> None:
        if self.accumulates is None:
            object.__setattr__(self, "accumulates", not self.edits_gradients)


@dataclass
class EpochContext:
    """What epoch hooks may use. ``batches(split)`` yields ``(inputs, masks, target)`` on the model's
    device, in a fixed order; ``forward`` runs the (possibly DDP-wrapped) model."""

    epoch: int
    epochs: int
    model: nn.Module
    task: Task
    batches: Callable[[str], Iterator[Batch]]
    forward: Callable[..., ModelOutput]
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_loaders(cls, model: nn.Module, task: Task, epoch: int, epochs: int, metrics: Mapping[str, float] | None = None,
                     **loaders: Iterable[Batch]) -> EpochContext:
        """A context for an own loop: ``loaders`` by split name (``train=..., val=...``), each an
        iterable of ``(inputs, masks, target)`` batches on the model's device."""
        def batches(split: str) -> Iterator[Batch]:
            if split not in loaders:
                raise ValueError(f"The method reads the {split!r} split at epoch boundaries: pass "
                                 f"EpochContext.from_loaders(..., {split}=loader).")
            yield from loaders[split]
        return cls(epoch, epochs, model, task, batches, model, dict(metrics or {}))


class Method(StepProtocol, legacy.LegacyHooks):
    """Base class and joint training (no balancing): see the module docstring."""

    name: ClassVar[str] = "joint"
    support: ClassVar[Support] = Support()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        overridden = [p for p in PHASES if p in cls.__dict__ and p not in legacy.RENAMED]
        if overridden:
            raise TypeError(f"{cls.__name__} overrides {overridden}, phases of the step protocol; write the hooks "
                            f"they call instead (see cggm.methods.base).")
        legacy.adapt(cls, Method)
        edits = any(h in cls.__dict__ for h in ("edit_gradients", "compute_gradients"))
        if edits and not cls.support.edits_gradients:
            raise TypeError(f"{cls.__name__} overrides compute_gradients/edit_gradients: declare it, "
                            f"support = Support(edits_gradients=True, ...).")
        if any(h in cls.__dict__ for h in ("on_epoch_start", "on_epoch_end")) and not cls.support.epoch_hooks:
            raise TypeError(f"{cls.__name__} overrides epoch hooks: declare it, support = Support(epoch_hooks=True, ...).")

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.task: Task | None = None
        self.modalities: tuple[str, ...] = ()
        self.optimizer: torch.optim.Optimizer | None = None
        self._records: dict[str, Tensor] = {}
        self._state_names: list[str] = []
        self._declared_params = None
        self._model_params: list[nn.Parameter] = []
        self._begin_protocol()

    # -- set-up -----------------------------------------------------------------------------------
    def bind(self, model: nn.Module, task: Task, modalities: Sequence[str] | None = None, *,
             modality_parameters: Mapping[str, Iterable[nn.Parameter]] | Sequence[Iterable[nn.Parameter]] | None = None,
             optimizer: torch.optim.Optimizer | None = None) -> Method:
        """Attach the method to ``model`` and ``task``; ``modalities`` in the order of
        ``ModelOutput.features`` (default ``model.modalities``); ``modality_parameters`` (by name or in
        modality order) for methods that act on encoder parameters of a model without
        ``modality_parameters()``; ``optimizer`` for methods that depend on it. Raises
        :class:`UnsupportedSettingError` for a setting the method does not support."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self.name}.bind() needs the model (an nn.Module), got {type(model).__name__}.")
        if not isinstance(task, Task):
            raise TypeError(f"{self.name}.bind() needs a cggm.Task, e.g. Task('classification', num_outputs=4); "
                            f"got {type(task).__name__}.")
        modalities = check_modalities(self.name, model, modalities)
        self.check_support(len(modalities), task)
        self.model, self.task, self.modalities = model, task, modalities
        self._declared_params = None if modality_parameters is None else by_modality(modality_parameters, modalities)
        self._model_params = list(model.parameters())  # (walking the module tree each step costs ~0.1 ms)
        self._all_groups: list[list[nn.Parameter]] | None = None
        if optimizer is not None:
            self.set_optimizer(optimizer)
        self.setup()
        return self

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Tell the method which optimizer steps the model (see :meth:`bind`)."""
        self.optimizer = optimizer

    def uses_epochs(self, start: int = 0, end: int | None = None) -> None:
        """Declare, for this instance, that it acts by epoch (an epoch window other than "always" or an
        epoch-dependent schedule): a loop that never calls ``begin_epoch`` is then refused."""
        if start or end is not None:
            self.support = dataclasses.replace(type(self).support, epoch_hooks=True)

    def check_support(self, num_modalities: int, task: Task) -> None:
        check_support(self.name, self.support, num_modalities, task)

    def modality_parameter_groups(self, model: nn.Module | None = None) -> list[list[nn.Parameter]]:
        """Each modality's trainable encoder parameters, in modality order (given to :meth:`bind`, else
        ``model.modality_parameters()``); read at each call, so an encoder unfrozen after ``bind`` counts."""
        if model is not None and model is not self.model:
            return [[p for p in ps if p.requires_grad] for ps in declared_groups(self.name, model, self.modalities, None)]
        if self._all_groups is None:
            self._all_groups = declared_groups(self.name, self.model, self.modalities, self._declared_params)
        return [[p for p in ps if p.requires_grad] for ps in self._all_groups]

    # -- declared state ---------------------------------------------------------------------------
    def add_state(self, name: str, default: Any) -> None:
        """Declare persistent state ``name`` (an attribute): a value, or a
        :class:`~cggm.methods.state.StateItem` (auxiliary modules, a random stream, a rule) that moves
        with the step. Saved, loaded and moved by the base."""
        if name in self._state_names:
            raise ValueError(f"{type(self).__name__} declares the state {name!r} twice.")
        self._state_names.append(name)
        setattr(self, name, default)

    def _state_items(self) -> list[StateItem]:
        items = [v for v in (getattr(self, n) for n in self._state_names) if isinstance(v, StateItem)]
        return items + [legacy.LegacyDrop(self)] if hasattr(type(self), "_legacy_discard") else items

    def modules(self) -> dict[str, nn.Module]:
        """The modules the method owns (auxiliary heads, classifiers), by state name."""
        return {n: v.modules for n in self._state_names if getattr(v := getattr(self, n), "modules", None) is not None
                and isinstance(v.modules, nn.Module)}

    def state_dict(self) -> dict[str, Any]:
        state = {"global_step": self.global_step, "epoch": self.epoch, "epochs_started": self._epochs_started}
        for n in self._state_names:
            v = getattr(self, n)
            state[n] = v.state_dict() if hasattr(v, "state_dict") and not isinstance(v, Tensor) else v
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.global_step, self.epoch = int(state.get("global_step", 0)), int(state.get("epoch", 0))
        self._epochs_started = int(state.get("epochs_started", 0))
        for n in self._state_names:
            v = getattr(self, n)
            if hasattr(v, "load_state_dict") and not isinstance(v, Tensor):
                v.load_state_dict(state.get(n, {}))
            elif n in state:
                setattr(self, n, _copy(state[n]))

    # -- hooks (no-ops by default) --------------------------------------------------------------------
    def setup(self) -> None:
        """Once, at the end of :meth:`bind` (``model``, ``task``, ``modalities`` are set): checks."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The model optimizer's parameter groups (an ``lr_scale`` key scales a group's lr)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def transform_batch(self, inputs: dict[str, Tensor], masks: dict[str, Tensor], training: bool) -> tuple[dict, dict]:
        """A batch's inputs and masks before the forward pass (training or evaluation)."""
        return inputs, masks

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        """The loss to back-propagate (default: the task loss); stage measurements, change no state."""
        return task_loss

    def compute_gradients(self, loss: Tensor) -> None:
        """Fill the parameters' ``.grad`` (default ``loss.backward()``; declare ``edits_gradients``)."""
        loss.backward()

    def edit_gradients(self) -> None:
        """Edit gradients after the backward pass, before clipping (declare ``edits_gradients``)."""

    def wrap_optimizer_step(self, take_step: Callable[[], bool]) -> bool:
        """Around the model's optimizer step: ``take_step()`` steps and says whether it was taken."""
        return take_step()

    def on_step_taken(self) -> None:
        """The step was taken (declared state items already stepped): advance statistics from :meth:`staged`."""

    def on_epoch_start(self, ctx: EpochContext) -> None:
        """An epoch starts (declare ``epoch_hooks``)."""

    def on_epoch_end(self, ctx: EpochContext) -> None:
        """An epoch ended; ``ctx.metrics`` are its validation metrics (declare ``epoch_hooks``)."""

    def eval_prediction(self, out: ModelOutput) -> Tensor:
        """The prediction scored at evaluation (default: the fused prediction)."""
        return out.prediction

    def eval_metrics(self) -> dict[str, Any]:
        """The method's own evaluation metrics, by name: objects with ``update(out, target)``,
        ``compute()`` (a number or a mapping of numbers) and ``reset()`` (torchmetrics metrics sync
        across ranks)."""
        return {}

    # -- helpers ------------------------------------------------------------------------------------
    def record(self, name: str, value: Tensor) -> None:
        """Keep a per-step scalar (a device tensor; the engine copies records to the host in bulk)."""
        self._records[name] = value.detach()

    def records(self) -> dict[str, Tensor]:
        """The scalars recorded during the last step."""
        return dict(self._records)

    def reset_records(self) -> None:
        self._records.clear()

    def scale_feature_gradients(self, out: ModelOutput, factors: Tensor) -> None:
        """Multiply the gradient flowing into encoder ``i`` through ``out.features[i]`` by ``factors[i]``
        (a hook per feature, so every parameter of the encoder gets exactly that factor); :meth:`step`
        checks every hook fired."""
        for i, h in enumerate(out.features):
            if h.requires_grad:
                fired = [False]
                h.register_hook(_FeatureScale(factors[i], fired))
                self._feature_hooks.append((self.modalities[i], fired))

    @property
    def ddp_find_unused_parameters(self) -> bool:
        return self.support.unused_parameters

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class _FeatureScale:
    """A tensor hook that multiplies the incoming gradient by a 0-d factor and notes that it ran."""

    def __init__(self, factor: Tensor, fired: list[bool]):
        self.factor, self.fired = factor, fired

    def __call__(self, grad: Tensor | None) -> Tensor | None:
        if grad is None:
            return None
        self.fired[0] = True
        return grad * self.factor.to(grad.dtype)


def _copy(value: Any) -> Any:
    """A loaded state value, its tensors cloned (so later in-place updates do not write into the checkpoint)."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value
