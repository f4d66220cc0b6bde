"""Any cggm method inside a PyTorch Lightning ``Trainer`` (``pip install 'cggm[lightning]'``).

:class:`MethodModule` is a ``LightningModule`` with manual optimization, the natural fit for the
method protocol (:mod:`cggm.methods.base`). Its ``training_step`` is::

    out = model(inputs, masks)
    loss = method.loss(out, target, task.loss(out.prediction, target))
    opt.zero_grad(set_to_none=True)
    self.manual_backward(loss)   # Lightning's precision plugin (fp16: scales the loss), then the
                                 # module's backward hook, which is method.backward(loss)
    method.step(opt)             # Lightning's optimizer step (strategy, precision, step count)

* **backward**: ``manual_backward`` runs Lightning's strategy and precision plugin and then calls
  the module's ``backward`` hook, overridden here to be ``method.backward``: the method's gradient
  edits (B on gradients, OGM-GE's noise, ...) see the loss as Lightning scaled it.
* **step**: ``self.optimizers()`` is a ``LightningOptimizer``; its class imitates the wrapped
  optimizer's (``isinstance(opt, torch.optim.Adam)`` holds) and attribute reads go through to it,
  so ``method.step(opt)`` steps through Lightning (``trainer.global_step`` advances) and still sees
  a skipped step (the wrapped optimizer's step hooks). With fp16 and a ``GradScaler``
  (``precision="16-mixed"``), Lightning's own step would call ``scaler.update()`` before the
  method's own optimizers (auxiliary heads trained from the scaled loss) stepped through the
  scaler, so that case steps ``method.step(opt.optimizer, scaler=scaler)``, then
  ``scaler.update()``, and advances Lightning's step count itself.
* **checkpoints**: the method's state (``method.state_dict()``: its auxiliary classifiers or heads,
  their optimizers, its statistics) and the RNG states are saved under ``checkpoint["cggm"]`` and
  restored on ``trainer.fit(..., ckpt_path=...)``; with :func:`dataloader` (cggm's engine order,
  fixed by seed and epoch) a run resumed from an epoch-end checkpoint ends like the uninterrupted
  run.
* **epochs and evaluation**: ``method.on_epoch_start`` at each training epoch's start,
  ``method.on_epoch_end`` after the epoch's validation (with its metrics), before the checkpoint
  of that epoch is written; validation and test log the task's metrics and the method's own
  (``val/accuracy``, ``val/clf/<modality>``, ...); the method's per-step records are logged as
  ``train/<name>`` (``train/B/<modality>``, ...).

Exactness of a resume is tested on a single process; under DDP the method's statistics are reduced
across ranks as in cggm's engine, but validation metrics are each rank's shard's.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .._optional import require
from ..data.base import BatchIterator, collate
from ..methods.base import EpochContext, Method
from ..methods.protocol import _observed
from ..optim import build_optimizer
from ..training.evaluation import EvalStep
from ..training.step import NonFiniteError, train_step
from ..training.trainer import _to_device  # a method's saved state onto the device, optimizer states left as they are
from ..types import ModelOutput, Task

require("lightning", "lightning", "cggm.integrations.lightning")
import lightning.pytorch as pl  # noqa: E402

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
CHECKPOINT_KEY = "cggm"


class MethodModule(pl.LightningModule):
    """A ``LightningModule`` that trains ``model`` with a cggm method (see the module docstring).

    Args:
        model: a module whose ``forward(inputs, masks)`` returns a :class:`~cggm.ModelOutput`
            (every ``cggm.models`` model does).
        method: any method, e.g. ``cggm.build_method("cggm")``; it is bound here.
        task: the :class:`~cggm.Task` (``data.task``).
        modalities, modality_parameters: as in ``Method.bind`` (default: what the model declares).
        optimizer: ``"adam"``, ``"adamw"``, ``"sgd"``, or a function of the parameter groups
            (``method.param_groups(model)``, each with its ``lr`` set) that returns an optimizer.
        lr, weight_decay, momentum: the named optimizers' settings.
        gradient_clip_val: clip the gradients' global norm to this (after the method's gradient
            edits and, under fp16, after unscaling), as cggm's engine does; ``None``: no clipping.
            (Lightning's ``Trainer(gradient_clip_val=...)`` is for automatic optimization only.)
        on_nonfinite: a NaN or inf loss or gradient norm ``"stop"``s training
            (:class:`NonFiniteError`) or ``"skip"``s the step (nothing moves, the method's staged
            state is dropped; counted in ``skipped_steps``).
        save_rng: save the torch, CUDA, numpy and Python RNG states in checkpoints and restore them
            when training resumes (dropout masks and random methods then continue as uninterrupted).
    """

    def __init__(self, model: nn.Module, method: Method, task: Task, modalities: Sequence[str] | None = None, *,
                 modality_parameters: Mapping[str, Iterable[nn.Parameter]] | Sequence[Iterable[nn.Parameter]] | None = None,
                 optimizer: Literal["adam", "adamw", "sgd"] | OptimizerFactory = "adam", lr: float = 1e-3,
                 weight_decay: float = 0.0, momentum: float = 0.9, gradient_clip_val: float | None = None,
                 on_nonfinite: Literal["stop", "skip"] = "stop", save_rng: bool = True) -> None:
        super().__init__()
        if not isinstance(method, Method):
            raise TypeError(f"MethodModule needs a cggm method (cggm.build_method(name)), got {type(method).__name__}.")
        if not callable(optimizer) and optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adam', 'adamw', 'sgd' or a function of the parameter groups, "
                             f"got {optimizer!r}.")
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}.")
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise ValueError(f"gradient_clip_val must be > 0 or None, got {gradient_clip_val}.")
        self.automatic_optimization = False
        self.model = model
        self.task = task
        self.method = method.bind(model, task, modalities, modality_parameters=modality_parameters)
        self.optimizer_spec, self.lr, self.weight_decay, self.momentum = optimizer, float(lr), weight_decay, momentum
        self.gradient_clip_val, self.on_nonfinite, self.save_rng = gradient_clip_val, on_nonfinite, save_rng
        self.skipped_steps = 0
        self._pending: dict[str, Any] | None = None  # a loaded checkpoint's cggm state, applied on the model's device
        self._pending_rng: dict[str, Any] | None = None
        self._eval: EvalStep | None = None  # the loader being scored
        self._eval_idx: int | None = None
        self._evals: dict[int, dict[str, float]] = {}  # each scored loader's metrics
        self._epoch_ended = -1

    # -- model and optimizer ---------------------------------------------------------------------
    def forward(self, inputs: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> ModelOutput:
        return self.model(inputs, masks)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = self.method.param_groups(self.model)
        spec = self.optimizer_spec
        if callable(spec):
            for g in groups:
                g["lr"] = self.lr * float(g.pop("lr_scale", 1.0))
            return spec(groups)
        return build_optimizer(spec, groups, self.lr, weight_decay=self.weight_decay, momentum=self.momentum)

    # -- the training step ---------------------------------------------------------------------------
    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's backward hook, reached through ``manual_backward`` after the precision plugin
        (which scales the loss under fp16): the method's backward pass and gradient edits."""
        self.method.backward(loss)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        opt = self.optimizers()
        inner = getattr(opt, "optimizer", opt)  # the torch optimizer a LightningOptimizer wraps
        if self.method.optimizer is not inner:
            self.method.set_optimizer(inner)  # CGGM chooses where B acts from it
        scaler = self._scaler()
        before, after = getattr(opt, "_on_before_step", None), getattr(opt, "_on_after_step", None)

        def scaled_step() -> bool:
            # fp16: the model's optimizer and the method's own ones step through the scaler before
            # scaler.update(); Lightning's step hooks run around it, as with opt.step()
            if before is not None:
                before()
            return _observed(inner, lambda: scaler.step(inner))

        try:
            result = train_step(self.method, opt, batch, forward=self.model, scaler=scaler,
                                clip_grad_norm=self.gradient_clip_val, backward=self.manual_backward,
                                step_optimizer=scaled_step if scaler is not None else opt,
                                on_nonfinite=self.on_nonfinite, where=f" (epoch {self.current_epoch}, batch {batch_idx})")
        except NonFiniteError as err:
            raise NonFiniteError(f"{err} Lower the learning rate, set gradient_clip_val, or on_nonfinite='skip'.") from None
        if result.skipped:
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
            return None
        if scaler is not None and after is not None:
            after()
        n = int(batch[2].shape[0])
        self.log("train/loss", result.loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        records = self.method.records()
        if records:
            self.log_dict({f"train/{k}": v for k, v in records.items()}, on_step=True, on_epoch=False, batch_size=n)
        return result.loss

    def _scaler(self) -> Any:
        return getattr(self.trainer.precision_plugin, "scaler", None)

    # -- epochs ------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._apply_pending()

    def on_train_start(self) -> None:
        # after the sanity check and the restore of the loops: the next draws are the resumed epoch's
        rng, self._pending_rng = self._pending_rng, None
        if rng is not None:
            _set_rng_state(rng)

    def on_train_epoch_start(self) -> None:
        self.method.begin_epoch(self._context())

    def on_train_epoch_end(self) -> None:
        if self._epoch_ended != self.current_epoch:  # no validation at this epoch's end
            self._end_epoch({})

    def _end_epoch(self, metrics: Mapping[str, float]) -> None:
        self._epoch_ended = self.current_epoch
        self.method.finish_epoch(self._context(metrics))

    def _context(self, metrics: Mapping[str, float] | None = None) -> EpochContext:
        epochs = max(int(self.trainer.max_epochs or 0), self.current_epoch + 1)
        return EpochContext(epoch=self.current_epoch, epochs=epochs, model=self.model, task=self.task,
                            batches=self._batches, forward=self.model, metrics=dict(metrics or {}))

    def _batches(self, split: str) -> Iterator[tuple[dict[str, Tensor], dict[str, Tensor], Tensor]]:
        """A split's batches on the model's device, for methods that read a split at epoch boundaries
        (PMR's prototypes, G-Blending's weights, MSLR's validation losses)."""
        trainer = self.trainer
        loaders = {"train": lambda: trainer.train_dataloader, "val": lambda: trainer.val_dataloaders,
                   "test": lambda: trainer.test_dataloaders}[split]()
        if loaders is None and split == "val" and trainer.state.fn == "fit":
            trainer.fit_loop.epoch_loop.val_loop.setup_data()  # not loaded before the first validation
            loaders = trainer.val_dataloaders
        if loaders is None:
            raise ValueError(f"{self.method.name} reads the {split!r} split at epoch boundaries, but the Trainer has no "
                             f"{split} dataloader: pass it to trainer.fit(...).")
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            for batch in loader:
                yield _move(batch, self.device)

    # -- evaluation --------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._eval_begin()

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        metrics = self._eval_end("val")
        trainer = self.trainer
        if trainer.state.fn == "fit" and not trainer.sanity_checking and trainer.is_last_batch:
            # the epoch's end: as in cggm's engine, the method's epoch-end hook sees the validation
            # metrics and runs before this epoch's checkpoint is written (on_validation_end)
            self._end_epoch(metrics)

    def on_test_epoch_start(self) -> None:
        self._eval_begin()

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        self._apply_pending()
        inputs, masks, _ = batch
        step = EvalStep(self.model, self.method, self.task, self.device, tracker=False, method_metrics=False)
        return step(inputs, masks, None)[1]

    def _eval_begin(self) -> None:
        self._apply_pending()
        self._eval, self._eval_idx, self._evals = None, None, {}

    def _eval_step(self, batch: Any, dataloader_idx: int = 0) -> None:
        # each loader scored on its own, never pooled. Lightning runs the loaders one after the other;
        # a loader's metrics are computed when the next one starts: one EvalStep at a time, since
        # EvalSteps reuse the task's metric tracker and the method's own metric objects (CGGM's clf)
        if dataloader_idx != self._eval_idx:
            self._close_eval()
            if dataloader_idx in self._evals:
                raise RuntimeError(f"Validation loader {dataloader_idx} came back after another one: MethodModule "
                                   f"scores the loaders one after the other (Lightning's sequential mode).")
            self._eval_idx = dataloader_idx
            self._eval = EvalStep(self.model, self.method, self.task, self.device, sync=False)
        self._eval(*batch)

    def _close_eval(self) -> None:
        if self._eval is not None:
            self._evals[self._eval_idx] = self._eval.compute()
            self._eval = None

    def _eval_end(self, prefix: str) -> dict[str, float]:
        """Log each loader's metrics (the first's as ``val/<name>``, loader i's as
        ``val/<name>/dataloader_idx_<i>``, Lightning's convention); the first loader's are returned (the
        validation split the method's epoch hook and checkpoint selection see)."""
        self._close_eval()
        first: dict[str, float] = {}
        for idx, metrics in sorted(self._evals.items()):
            suffix = "" if idx == 0 else f"/dataloader_idx_{idx}"
            self.log_dict({f"{prefix}/{k}{suffix}": float(v) for k, v in metrics.items()}, prog_bar=False,
                          add_dataloader_idx=False)
            if idx == 0:
                first = metrics
        return first

    # -- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "method_name": self.method.name,
            "method": self._pending["method"] if self._pending is not None else self.method.state_dict(),
            "skipped_steps": self.skipped_steps,
            "epoch_ended": self._epoch_ended,
            "rng": _rng_state() if self.save_rng else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            raise KeyError(f"The checkpoint has no {CHECKPOINT_KEY!r} entry: it was not written by a cggm MethodModule, "
                           f"so the method's state (its classifiers or heads, statistics) cannot be restored.")
        if state["method_name"] != self.method.name:
            raise ValueError(f"The checkpoint was written with method {state['method_name']!r}, this module runs "
                             f"{self.method.name!r}.")
        # applied once the model is on its device (Lightning restores a checkpoint before moving it)
        self._pending = state
        self._pending_rng = state.get("rng") if self.save_rng else None

    def _apply_pending(self) -> None:
        state, self._pending = self._pending, None
        if state is None:
            return
        device = next(self.model.parameters()).device
        self.method.load_state_dict(_to_device(state["method"], device))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._epoch_ended = int(state.get("epoch_ended", -1))


class EpochSampler(torch.utils.data.Sampler[int]):
    """cggm's engine order: a permutation fixed by ``(seed, epoch)`` (or the dataset's order when
    ``shuffle=False``). Lightning calls :meth:`set_epoch` at each epoch, so a resumed run sees the
    batches the uninterrupted run saw."""

    def __init__(self, dataset: Any, shuffle: bool = True, seed: int = 0) -> None:
        self.dataset, self.shuffle, self.seed, self.epoch = dataset, shuffle, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(BatchIterator(self.dataset, 1, self.shuffle, self.seed, self.epoch).indices().tolist())

    def __len__(self) -> int:
        return len(self.dataset)


def dataloader(dataset: Any, batch_size: int, *, shuffle: bool = False, seed: int = 0,
               **kwargs: Any) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` of ``(inputs, masks, target)`` batches over a cggm dataset (``data.train``),
    in cggm's engine order (:class:`EpochSampler`). Its own generator seeds workers, so iterating it
    draws nothing from the global RNG. Extra keyword arguments go to ``DataLoader``."""
    kwargs.setdefault("collate_fn", collate)
    kwargs.setdefault("generator", torch.Generator().manual_seed(int(seed)))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                       sampler=EpochSampler(dataset, shuffle, seed), **kwargs)


# -- helpers ---------------------------------------------------------------------------------------
def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(v, device) for v in obj)
    return obj


def _rng_state() -> dict[str, Any]:
    """The RNG states, in types that Lightning's ``weights_only`` checkpoint loading accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
