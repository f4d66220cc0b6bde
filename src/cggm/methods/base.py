"""The one interface every balancing method implements.

A training step, in the engine and in a user's own loop, has four phases::

    inputs, masks = method.prepare(inputs, masks)          # 1. inputs (e.g. modality dropout)
    out = model(inputs, masks)                             #    ModelOutput: prediction + features
    loss = method.loss(out, target, task.loss(out.prediction, target))   # 2. the loss
    optimizer.zero_grad(set_to_none=True)
    method.backward(loss)                                  # 3. gradients (and a method's edits)
    # (clip gradients here if you want to: B and every other gradient edit are already in them)
    method.step(optimizer)                                 # 4. the update; or step(optimizer, scaler=scaler)

What each phase may do, so that a skipped or accumulated step is never wrong:

* :meth:`loss` computes; it never steps an optimizer and never advances a method's statistics.
  What it measures (classifier metrics, coefficients, an auxiliary loss) is *staged*.
* :meth:`backward` back-propagates (outside autocast; CGGM's classifiers learn from the same pass)
  and applies the method's gradient edits (modulation, noise), before any clipping or finite check
  of the caller.
* :meth:`step` takes the optimizer step (through a ``GradScaler`` if given, or any step function)
  and then *commits* what was staged: the method's own modules (auxiliary classifiers, heads) are
  stepped and its statistics advance, once per optimizer step. Under gradient accumulation,
  ``loss``/``backward`` run once per micro-batch and ``step`` once.
* :meth:`skip` drops what was staged when the caller does not take the step (a non-finite loss):
  the method's state is left exactly as it was.

The library notices a loop that bypasses a phase: the model's parameters changed since the last
:meth:`loss` without :meth:`step` (a plain ``optimizer.step()`` or ``scaler.step(optimizer)``), a
method that edits gradients stepped without :meth:`backward`, or a feature-gradient hook that never
fired (the model returned tensors its prediction was not computed from). Each raises
:class:`ProtocolError` naming the fix, since the modulation was silently not applied otherwise.

Methods override a few hooks, each named for what it does: :meth:`setup`, :meth:`param_groups`,
:meth:`prepare`, :meth:`compute_loss`, :meth:`compute_gradients`, :meth:`edit_gradients`,
:meth:`update` (around the optimizer step), :meth:`commit` and :meth:`discard`, the epoch and
evaluation hooks, and :meth:`state_dict` / :meth:`load_state_dict`. The engine never branches on a
method's name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import distributed
from ..types import TASK_KINDS, ModelOutput, Task

Batch = tuple[dict[str, Tensor], dict[str, Tensor], Tensor]  # inputs, masks, target
StepFunction = Callable[[], Any]


class UnsupportedSettingError(ValueError):
    """A method was asked to run in a setting it does not support."""


class ProtocolError(RuntimeError):
    """The training step bypassed a phase of the method protocol (see :mod:`cggm.methods.base`),
    so the method's modulation would silently not be applied."""


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
    # True for a method whose compute_gradients only *adds* to the gradients, as loss.backward()
    # does (CGGM: its classifiers' gradients come from the same backward pass), so gradient
    # accumulation over micro-batches is sound; methods that edit or replace gradients refuse it
    accumulates_gradients: ClassVar[bool] = False

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.task: Task | None = None
        self.modalities: tuple[str, ...] = ()
        self.optimizer: torch.optim.Optimizer | None = None
        self.global_step = 0  # optimizer steps taken (skipped steps do not count)
        self.epoch = 0
        self._records: dict[str, Tensor] = {}
        self._declared_params: dict[str, list[nn.Parameter]] | None = None
        self._model_params: list[nn.Parameter] = []
        self._groups_cache: list[list[nn.Parameter]] | None = None
        # protocol bookkeeping of the step in progress
        self._n_losses = 0  # loss() calls since the last step() / skip()
        self._n_backwards = 0  # backward() calls since the last step() / skip()
        self._version_mark = 0
        self._feature_hooks: list[tuple[str, list[bool]]] = []

    # -- set-up -----------------------------------------------------------------------------
    def bind(self, model: nn.Module, task: Task, modalities: Sequence[str] | None = None, *,
             modality_parameters: Mapping[str, Iterable[nn.Parameter]] | Sequence[Iterable[nn.Parameter]] | None = None,
             optimizer: torch.optim.Optimizer | None = None) -> Method:
        """Attach the method to a model and task.

        modalities: the modality names, in the order of ``ModelOutput.features``; defaults to
            ``model.modalities``.
        modality_parameters: each modality's encoder parameters, as a mapping by name or a sequence
            in modality order, for methods that act on them when the model does not declare
            ``modality_parameters()``.
        optimizer: the model's optimizer, for methods whose behaviour depends on it (CGGM chooses
            where B acts from it); also settable later with :meth:`set_optimizer`.

        Raises :class:`UnsupportedSettingError` for a setting the method does not support.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self.name}.bind() needs the model (an nn.Module), got {type(model).__name__}.")
        if not isinstance(task, Task):
            raise TypeError(f"{self.name}.bind() needs a cggm.Task, e.g. Task('classification', num_outputs=4); "
                            f"got {type(task).__name__}.")
        if modalities is None:
            modalities = getattr(model, "modalities", None)
            if modalities is None:
                raise ValueError(f"{self.name}.bind(): the model does not declare its modalities; pass them in the "
                                 f"order of ModelOutput.features, e.g. bind(model, task, modalities=['audio', 'video']).")
        if isinstance(modalities, str):
            raise TypeError(f"modalities must be a list of names, got the string {modalities!r}.")
        modalities = tuple(modalities)
        if any(not isinstance(m, str) or not m for m in modalities):
            raise TypeError(f"Modality names must be non-empty strings, got {list(modalities)}.")
        dup = sorted({m for m in modalities if modalities.count(m) > 1})
        if dup:
            raise ValueError(f"Duplicate modality names {dup} in {list(modalities)}: every modality needs its own name.")
        self.check_support(len(modalities), task)
        self.model, self.task, self.modalities = model, task, modalities
        self._declared_params = None if modality_parameters is None else _by_modality(modality_parameters, modalities)
        self._model_params = list(model.parameters())  # (walking the module tree each step costs ~0.1 ms)
        self._groups_cache: list[list[nn.Parameter]] | None = None
        if optimizer is not None:
            self.set_optimizer(optimizer)
        self.setup()
        return self

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Tell the method which optimizer steps the model (see :meth:`bind`)."""
        self.optimizer = optimizer

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

    def modality_parameter_groups(self, model: nn.Module | None = None) -> list[list[nn.Parameter]]:
        """Each modality's trainable encoder parameters, in modality order: those given to
        :meth:`bind`, else ``model.modality_parameters()``. A parameter in two modalities' groups is
        refused: scaling or editing it per modality would apply two modalities' factors to it."""
        model = self.model if model is None else model
        if model is self.model and self._groups_cache is not None:
            return self._groups_cache
        if self._declared_params is not None and model is self.model:
            declared = self._declared_params
        elif hasattr(model, "modality_parameters"):
            declared = model.modality_parameters()
        else:
            raise UnsupportedSettingError(
                f"Method {self.name!r} acts on each modality's encoder parameters: pass "
                f"bind(..., modality_parameters={{'audio': enc_a.parameters(), ...}}) or give the model a "
                f"modality_parameters() method (cggm MultimodalModel does).")
        missing = [m for m in self.modalities if m not in declared]
        if missing:
            raise ValueError(f"No encoder parameters declared for modalities {missing}; declared: {sorted(declared)}.")
        groups = [[p for p in declared[m] if p.requires_grad] for m in self.modalities]
        owner: dict[int, str] = {}
        for m, ps in zip(self.modalities, groups):
            for p in ps:
                other = owner.setdefault(id(p), m)
                if other != m:
                    raise ValueError(
                        f"A parameter of shape {tuple(p.shape)} is declared for both {other!r} and {m!r}. "
                        f"{self.name} scales or edits each modality's parameters by that modality's factor, "
                        f"which is undefined for a shared parameter: declare shared layers in neither "
                        f"modality (they then train like the fusion module).")
        if model is self.model:
            self._groups_cache = groups
        return groups

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Parameter groups for the model's optimizer (a method may give modalities their own lr
        by adding an ``lr_scale`` key to a group)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    # -- the step: public phases -------------------------------------------------------------------
    def prepare(self, inputs: dict[str, Tensor], masks: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Transform a training batch before the forward pass (default: unchanged)."""
        return inputs, masks

    def prepare_eval(self, inputs: dict[str, Tensor], masks: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Transform an evaluation batch before the forward pass (default: unchanged)."""
        return inputs, masks

    def loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        """The loss to back-propagate for this (micro-)batch. Stages, never commits."""
        self._require_bound("loss")
        if not isinstance(out, ModelOutput):
            kind = type(out).__name__
            raise TypeError(
                f"{self.name}.loss() needs a cggm.ModelOutput, got a {kind}. Wrap what your model returns: "
                f"ModelOutput(prediction, features), with features the per-modality tensors the fusion consumed.")
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
        """Back-propagate ``loss`` (:meth:`compute_gradients`) and apply the method's gradient
        edits (:meth:`edit_gradients`), before the caller clips or checks the gradients."""
        self._require_bound("backward")
        if not self._n_losses:
            raise ProtocolError(f"{self.name}.backward() was called without {self.name}.loss() for this step.")
        if self._edits_gradients() and not self._accumulates() and self._n_losses > 1:
            raise ProtocolError(
                f"{self.name} edits the gradients after each backward pass, which under gradient accumulation "
                f"would edit the earlier micro-batches' gradients again; take one optimizer step per batch.")
        # (outside autocast, as torch recommends: on CPU the backward runs on this thread, where an
        # enclosing autocast, e.g. Lightning's around the training step, would cast the backward
        # ops of fp32 modules, such as CGGM's classifiers, to half precision)
        with no_autocast(loss.device.type):
            self.compute_gradients(loss)
        self.edit_gradients()
        self._n_backwards += 1

    def step(self, optimizer: torch.optim.Optimizer | StepFunction, *, scaler: Any = None) -> bool:
        """Take the optimizer step and commit the method's staged state; returns whether the step
        was taken.

        optimizer: a ``torch.optim.Optimizer`` (or a wrapper of one that keeps it in
            ``.optimizer``, as Accelerate's and Lightning's do), or any function that takes the
            model's step (it may return ``False`` to say it skipped it).
        scaler: a ``torch.amp.GradScaler``: with an optimizer the step is
            ``scaler.step(optimizer)`` (skipped when it finds inf/NaN gradients, and then nothing
            is committed); with a step function, that function takes the model's step (through
            the scaler) itself. Either way the method's own optimizers step through the scaler
            too, before you call ``scaler.update()``.
        """
        self._require_bound("step")
        if not self._n_losses:
            raise ProtocolError(f"{self.name}.step() was called without {self.name}.loss() since the last step.")
        if self._edits_gradients() and self._n_backwards < self._n_losses:
            raise ProtocolError(
                f"{self.name} edits gradients after the backward pass (or computes them itself), but the "
                f"backward pass did not go through it: call method.backward(loss) instead of loss.backward().")
        self._check_feature_hooks()
        if isinstance(optimizer, torch.optim.Optimizer) and self.optimizer is None:
            self.set_optimizer(optimizer)
        taken = bool(self.update(_step_function(optimizer, scaler)))
        if taken:
            self.commit(scaler)
            self.global_step += 1
        else:
            self.discard()
        self._end_step()
        return taken

    def skip(self) -> None:
        """The caller does not take this step (e.g. a non-finite loss): drop what :meth:`loss`
        staged, leaving the method's state exactly as before the step."""
        if self._n_losses:
            self.discard()
        self._end_step()

    # -- the step: hooks for methods ---------------------------------------------------------------
    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        """The loss to back-propagate (default: the task loss). May stage values for
        :meth:`commit`; must not step an optimizer or change the method's state."""
        return task_loss

    def compute_gradients(self, loss: Tensor) -> None:
        """Fill the parameters' ``.grad`` (default: ``loss.backward()``)."""
        loss.backward()

    def edit_gradients(self) -> None:
        """Edit gradients after the backward pass, before clipping (default: nothing)."""

    def update(self, take_step: Callable[[], bool]) -> bool:
        """Around the model's optimizer step: ``take_step()`` steps it and returns whether it was
        taken (a GradScaler may skip it). Returns that (default: just ``take_step()``)."""
        return take_step()

    def commit(self, scaler: Any = None) -> None:
        """The step was taken: step the method's own modules and advance its statistics with what
        :meth:`compute_loss` staged (default: nothing). ``scaler`` steps method-owned optimizers
        whose gradients came from the scaled loss."""

    def discard(self) -> None:
        """The step was not taken: forget what :meth:`compute_loss` staged (default: nothing)."""

    # -- helpers for methods -----------------------------------------------------------------------
    def scale_feature_gradients(self, out: ModelOutput, factors: Tensor) -> None:
        """Multiply the gradient that flows into encoder ``i`` through ``out.features[i]`` by
        ``factors[i]`` (a hook per feature tensor, so every parameter of the encoder, its input
        projection included, gets exactly ``factors[i]`` times its gradient, with no name
        matching). :meth:`step` checks that every hook fired."""
        for i, h in enumerate(out.features):
            if h.requires_grad:
                fired = [False]
                h.register_hook(_FeatureScale(factors[i], fired))
                self._feature_hooks.append((self.modalities[i], fired))

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
        """Forget the last step's records (:meth:`loss` does it at the first micro-batch of a step)."""
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

    # -- internals --------------------------------------------------------------------------------
    def _require_bound(self, phase: str) -> None:
        if self.model is None:
            raise ProtocolError(f"{self.name}.{phase}() was called before bind(): call "
                                f"method.bind(model, task, modalities=[...]) first.")

    def _edits_gradients(self) -> bool:
        cls = type(self)
        return cls.edit_gradients is not Method.edit_gradients or cls.compute_gradients is not Method.compute_gradients

    def _accumulates(self) -> bool:
        cls = type(self)
        return cls.accumulates_gradients and cls.edit_gradients is Method.edit_gradients

    def _parameter_version(self) -> int:
        # in-place updates (every optimizer's step) bump a tensor's version counter; reading it
        # is a host-side integer, no device synchronisation
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

    def _end_step(self) -> None:
        self._n_losses = 0
        self._n_backwards = 0
        self._feature_hooks = []


class _FeatureScale:
    """A tensor hook that multiplies the incoming gradient by a 0-d factor and notes that it ran."""

    def __init__(self, factor: Tensor, fired: list[bool]):
        self.factor, self.fired = factor, fired

    def __call__(self, grad: Tensor | None) -> Tensor | None:
        if grad is None:  # (no gradient reached the tensor: nothing to scale, and not fired)
            return None
        self.fired[0] = True
        return grad * self.factor.to(grad.dtype)


def no_autocast(device_type: str):
    """A context without autocast on ``device_type`` (a no-op context when autocast is off there)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta): it cannot be on there
        enabled = False
    return torch.autocast(device_type=device_type, enabled=False) if enabled else contextlib.nullcontext()


def _by_modality(params, modalities: Sequence[str]) -> dict[str, list[nn.Parameter]]:
    if isinstance(params, Mapping):
        unknown = sorted(set(params) - set(modalities))
        if unknown:
            raise ValueError(f"modality_parameters names unknown modalities {unknown}; the modalities are "
                             f"{list(modalities)}.")
        return {m: list(ps) for m, ps in params.items()}
    params = list(params)
    if len(params) != len(modalities):
        raise ValueError(f"modality_parameters has {len(params)} groups for {len(modalities)} modalities "
                         f"{list(modalities)}; give one group per modality, in the same order.")
    return {m: list(ps) for m, ps in zip(modalities, params)}


def _step_function(optimizer, scaler) -> Callable[[], bool]:
    """A function that takes the model's step and returns whether it was taken."""
    if scaler is not None and isinstance(optimizer, torch.optim.Optimizer):
        return lambda: _observed(optimizer, lambda: scaler.step(optimizer))
    if isinstance(optimizer, torch.optim.Optimizer):
        return lambda: _observed(optimizer, optimizer.step)
    if callable(optimizer):
        return lambda: optimizer() is not False
    raise TypeError(f"step() needs an optimizer or a step function, got {type(optimizer).__name__}.")


def _innermost(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer that actually steps: wrappers (Accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer) keep it in ``.optimizer``; some subclass Optimizer without
    initialising it, so their own step hooks do not exist."""
    seen = 0
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer) and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    return optimizer


def _observed(optimizer: torch.optim.Optimizer, run: Callable[[], Any]) -> bool:
    """Run ``run`` (which steps ``optimizer``, possibly through a wrapper or a GradScaler) and
    return whether the underlying optimizer's step actually ran."""
    ran = [False]

    def hook(*_: Any) -> None:
        ran[0] = True

    handle = _innermost(optimizer).register_step_post_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return ran[0]
