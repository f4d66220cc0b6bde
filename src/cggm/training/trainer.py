"""The training engine: one loop for every method, short enough to read top to bottom.

* train / validation / test: the checkpoint and the learning-rate schedule are chosen on
  validation only; test is evaluated once, on the selected checkpoint. (Two methods also read
  validation during training, as their papers' held-out set: G-Blending's weights and MSLR's
  dynamic learning rates. Their validation numbers are then optimistic; test is untouched.)
* per-step records of each method (B, L_gm, cosines, ...), copied to the host once per epoch;
  per-epoch validation metrics, including each method's own (e.g. the auxiliary classifiers').
* checkpoints every ``checkpoint_every`` steps and at each epoch end, written atomically, with
  everything needed for an exact resume (model, optimizer, scheduler, method state, RNG, data
  position); a resume with other settings than the checkpoint's is refused, naming each change.
* as it goes: ``metrics.jsonl`` (a line per epoch), ``history.json``, then ``records.json`` and
  ``result.json`` (and TensorBoard scalars with ``tensorboard=True``); progress on stderr, a bar on
  a terminal and a plain line every ``log_interval`` seconds otherwise.
* a non-finite loss or gradient stops the run with a message naming the step (or, with
  ``on_nonfinite="skip"``, skips and counts the step).
* DDP: if ``torch.distributed`` is initialised, the model is wrapped in DistributedDataParallel,
  each rank trains on its shard of every global batch (``batch_size`` per rank; global batch b is
  the one a single process with ``batch_size x world`` sees), so a run equals the single-process
  run with the global batch up to float rounding; only rank 0 logs and writes files.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..data.base import BatchIterator, DataSplits
from ..methods.base import EpochContext, Method
from ..optim import build_optimizer
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .evaluation import EvalStep, evaluate
from .outputs import RunFiles, require_tensorboard, write_json
from .progress import Progress
from .step import NonFiniteError, train_step


class TrainConfigError(ValueError):
    """Invalid training settings. ``problems`` lists ``(field, message)``, one per problem, each
    message naming its field (e.g. ``("lr", "lr must be > 0, got -1")``)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)
        lines = [msg for _, msg in self.problems]
        text = (f"Invalid training config: {lines[0]}." if len(lines) == 1 else
                f"Invalid training config ({len(lines)} problems):\n" + "\n".join(f"  {m}." for m in lines))
        super().__init__(text)


# settings a resumed run may change: how it reports and paces itself, not what it computes
# (``epochs`` may grow: see Trainer._load_resume_state)
RESUMABLE_CHANGES = ("epochs", "progress", "log_interval", "threads", "tensorboard", "checkpoint_every",
                     "step_delay", "eval_batch_size", "deterministic", "on_nonfinite")


@dataclass
class TrainConfig:
    """Everything the engine needs besides the model, the method and the data.

    Every field is checked when the config is made; all problems are reported together
    (:class:`TrainConfigError`, a ``ValueError``)."""

    epochs: int = 10
    batch_size: int = 64  # per process: under DDP the global batch is batch_size x world size
    eval_batch_size: int = 256
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: Literal["none", "plateau", "cosine"] = "none"
    plateau_patience: int = 10
    plateau_factor: float = 0.1
    warmup_epochs: int = 0
    warmup_start_lr: float | None = None
    min_lr: float = 0.0
    clip_grad_norm: float | None = None
    seed: int = 0
    on_nonfinite: Literal["stop", "skip"] = "stop"
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0 = only at epoch ends
    select_metric: str | None = None  # default: accuracy / mae / dice_mean by task
    select_mode: Literal["max", "min"] | None = None
    progress: bool = True
    log_interval: float = 30.0  # seconds between plain progress lines when stderr is not a terminal
    threads: int | None = None  # torch.set_num_threads during fit(); None leaves torch alone
    tensorboard: bool = False  # TensorBoard scalars in OUTPUT/tensorboard (the `tensorboard` extra)
    deterministic: bool = False
    step_delay: float = 0.0  # seconds slept after each step (to test fault tolerance; 0 = off)

    _INTS = ("epochs", "batch_size", "eval_batch_size", "plateau_patience", "warmup_epochs", "seed", "checkpoint_every",
             "threads")
    _FLOATS = ("lr", "weight_decay", "momentum", "plateau_factor", "min_lr", "step_delay", "warmup_start_lr",
               "clip_grad_norm", "log_interval")
    _BOOLS = ("progress", "deterministic", "tensorboard")
    _CHOICES = {"optimizer": ("adam", "adamw", "sgd"), "scheduler": ("none", "plateau", "cosine"),
                "on_nonfinite": ("stop", "skip"), "select_mode": ("max", "min")}
    _OPTIONAL = ("warmup_start_lr", "clip_grad_norm", "threads", "select_mode", "select_metric")
    _RANGES = {  # field: (test of a value of the right type, what the value must be)
        "epochs": (lambda v: v >= 1, ">= 1"),
        "batch_size": (lambda v: v >= 1, ">= 1"),
        "eval_batch_size": (lambda v: v >= 1, ">= 1"),
        "lr": (lambda v: v > 0, "> 0"),
        "weight_decay": (lambda v: v >= 0, ">= 0"),
        "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "plateau_patience": (lambda v: v >= 0, ">= 0"),
        "plateau_factor": (lambda v: 0 < v < 1, "in (0, 1) (the learning rate is multiplied by it)"),
        "warmup_epochs": (lambda v: v >= 0, ">= 0"),
        "warmup_start_lr": (lambda v: v >= 0, ">= 0"),
        "min_lr": (lambda v: v >= 0, ">= 0"),
        "clip_grad_norm": (lambda v: v > 0, "> 0 or null"),
        "checkpoint_every": (lambda v: v >= 0, ">= 0 (steps; 0: at epoch ends only)"),
        "step_delay": (lambda v: v >= 0, ">= 0"),
        "log_interval": (lambda v: v >= 0, ">= 0 (seconds)"),
        "threads": (lambda v: v >= 1, ">= 1 or null (null: leave torch's setting)"),
        "select_metric": (lambda v: isinstance(v, str) and v != "",
                          "a metric name (e.g. accuracy, mae, loss) or null (the task's default)"),
    }

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise TrainConfigError(problems)

    def problems(self) -> list[tuple[str, str]]:
        """``(field, message)`` for every invalid field (numbers given as strings are converted first)."""
        bad = self._coerce_types()
        out = []
        for f in fields(self):
            name, value = f.name, getattr(self, f.name)
            if name in bad:
                out.append((name, bad[name]))
            elif value is None and name in self._OPTIONAL:
                continue
            elif name in self._CHOICES and value not in self._CHOICES[name]:
                choices = list(self._CHOICES[name]) + (["null"] if name in self._OPTIONAL else [])
                out.append((name, f"{name} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}"))
            elif name in self._RANGES and not self._RANGES[name][0](value):
                out.append((name, f"{name} must be {self._RANGES[name][1]}, got {value!r}"))
        named = {n for n, _ in out}
        if self.scheduler in ("cosine", "plateau") and not {"lr", "min_lr"} & named and self.min_lr > self.lr:
            out.append(("min_lr", f"min_lr must be <= lr with the {self.scheduler} scheduler, got {self.min_lr} > "
                                  f"lr {self.lr}"))
        # settings that would be accepted and then do nothing
        if self.scheduler == "none" and "min_lr" not in named and self.min_lr != 0:
            out.append(("min_lr", f"min_lr ({self.min_lr}) is the floor of the plateau and cosine schedulers and "
                                  f"scheduler is 'none': set scheduler to plateau or cosine, or remove min_lr"))
        if not {"warmup_epochs", "scheduler"} & named and self.warmup_epochs > 0 and self.scheduler == "plateau":
            out.append(("warmup_epochs", f"warmup_epochs ({self.warmup_epochs}) works with scheduler 'none' or "
                                         f"'cosine', not 'plateau': set warmup_epochs to 0 or use scheduler cosine"))
        if not {"warmup_epochs", "warmup_start_lr"} & named and self.warmup_start_lr is not None \
                and self.warmup_epochs == 0:
            out.append(("warmup_start_lr", f"warmup_start_lr ({self.warmup_start_lr}) is used only with "
                                           f"warmup_epochs > 0: set warmup_epochs or remove warmup_start_lr"))
        if not {"warmup_epochs", "warmup_start_lr", "scheduler"} & named and self.warmup_epochs > 0 \
                and self.scheduler == "none" and self.warmup_start_lr is None:
            out.append(("warmup_start_lr", f"warmup_epochs ({self.warmup_epochs}) with scheduler 'none' ramps the "
                                           f"learning rate from warmup_start_lr to lr, and warmup_start_lr is not set: "
                                           f"set it (e.g. 0.0)"))
        return out

    def _coerce_types(self) -> dict[str, str]:
        """Numbers given as strings (YAML reads ``1e-3`` as a string) become numbers. Returns
        ``{field: message}`` for the fields of the wrong type (or a non-finite number)."""
        bad = {}
        for name in self._INTS + self._FLOATS + self._BOOLS:
            value = getattr(self, name)
            if value is None and name in self._OPTIONAL:
                continue
            kind = ("an integer" if name in self._INTS else "a finite number" if name in self._FLOATS
                    else "true or false")
            good = isinstance(value, bool) if name in self._BOOLS else not isinstance(value, bool)
            try:
                if good and name in self._INTS:
                    good = float(value) == int(float(value))
                    value = int(float(value))
                elif good and name in self._FLOATS:
                    value = float(value)
                    good = math.isfinite(value)
            except (TypeError, ValueError, OverflowError):
                good = False
            if not good:
                bad[name] = f"{name} must be {kind}" + (" or null" if name in self._OPTIONAL else "") + \
                    f", got {getattr(self, name)!r}"
                continue
            setattr(self, name, value)
        return bad

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint (all but RESUMABLE_CHANGES)."""
        return {k: v for k, v in asdict(self).items() if k not in RESUMABLE_CHANGES}


@dataclass
class RunResult:
    best_epoch: int
    val: dict[str, float]
    test: dict[str, float]
    history: list[dict[str, Any]]
    records: dict[str, list[float]]
    skipped_steps: int = 0
    seconds: float = 0.0
    seconds_per_epoch: float = 0.0
    output_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to(batch, device):
    inputs, masks, target = batch
    return ({k: v.to(device, non_blocking=True) for k, v in inputs.items()},
            {k: v.to(device, non_blocking=True) for k, v in masks.items()}, target.to(device, non_blocking=True))


@dataclass
class _Run:
    """A run's bookkeeping across epochs (what a checkpoint keeps to resume it)."""

    start_epoch: int = 0
    skip: int = 0  # batches of start_epoch already trained (a mid-epoch resume)
    best: dict[str, Any] = field(default_factory=lambda: {"metric": None, "epoch": -1, "val": {}})
    history: list[dict[str, Any]] = field(default_factory=list)
    records: dict[str, list[float]] = field(default_factory=dict)
    partial: dict[str, Any] = field(default_factory=lambda: {"loss_sum": 0.0, "steps": 0, "seconds": 0.0})
    logged: dict[str, int] = field(default_factory=dict)
    best_weights: dict[str, Any] | None = None
    best_method: dict[str, Any] | None = None


class Trainer:
    """Train ``model`` with ``method`` on ``data``; see the module docstring.

    The model stays on the device it is on (move it before); batches follow it.
    ``output_dir`` receives ``last.pt``, ``best.pt``, ``metrics.jsonl``, ``history.json``,
    ``records.json`` and ``result.json`` (rank 0 only; see :mod:`cggm.training.outputs`); with
    ``resume=True`` an existing ``last.pt`` there is resumed, if it was written with the same
    settings (``fingerprint``: method, modalities, dataset, the training settings but those in
    ``RESUMABLE_CHANGES``, and what the caller adds), else refused naming each difference.
    """

    def __init__(self, model: nn.Module, method: Method, data: DataSplits, config: TrainConfig | None = None,
                 output_dir: str | Path | None = None, resume: bool = True, fingerprint: dict[str, Any] | None = None):
        self.config = config or TrainConfig()
        self.data, self.task = data, data.task
        self.model = model
        self.device = _device_of(model)
        self.method = method.bind(model, data.task, data.modalities)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.resume = resume
        # what a resumed run must share with its checkpoint (load_checkpoint names each difference);
        # the caller adds what the engine cannot see (cggm.runner: the model's and the options of the
        # data, model and method, as configured)
        self.fingerprint = {"method": method.name, "modalities": list(data.modalities), "dataset": data.name,
                            "train": self.config.fingerprint(), **(fingerprint or {})}
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if self.config.tensorboard:
            if self.output_dir is None:
                raise TrainConfigError([("tensorboard", "tensorboard needs an output directory (--output) to write to")])
            if distributed.is_main_process():
                require_tensorboard()  # now, not after the first epoch
        # read and check a checkpoint to resume now, before anything is written or trained
        self._resume_state = self._load_resume_state() if resume else None
        self.train_model: nn.Module = model
        if distributed.is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" and self.device.index is not None else None
            self.train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=ids, find_unused_parameters=method.support.unused_parameters)
        self.optimizer = self._make_optimizer()
        self.method.set_optimizer(self.optimizer)
        self.scheduler = None
        self.select_name, self.select_mode = self.task.headline.name, self.task.headline.mode
        if self.config.select_metric:
            self.select_name = self.config.select_metric
            self.select_mode = self.config.select_mode or ("max" if self.task.higher_is_better(self.select_name)
                                                           else "min")
            names = self.metric_names()
            if names is not None and self.select_name not in names:
                raise TrainConfigError([("select_metric", f"select_metric {self.select_name!r} is not a metric of "
                                                          f"this run; it has {', '.join(sorted(names))}")])
        self.skipped_steps = 0

    # -- construction ---------------------------------------------------------------------------
    @property
    def last_checkpoint(self) -> Path | None:
        return self.output_dir / "last.pt" if self.output_dir is not None else None

    def _load_resume_state(self) -> dict[str, Any] | None:
        last = self.last_checkpoint
        if last is None or not last.exists():
            return None
        state = load_checkpoint(last, expect=self.fingerprint)
        missing = [k for k in ("model", "optimizer", "method", "rng", "epoch", "batch") if k not in state]
        if missing:
            raise CheckpointError(f"Checkpoint {last} lacks {missing}; it is not a resumable last.pt.")
        done = state["epoch"] + (1 if state["batch"] else 0)  # epochs trained, or started
        if self.config.epochs < done:
            old = state.get("config", {}).get("epochs", "?")
            raise CheckpointError(
                f"Checkpoint {last} is incompatible with this run: its settings differ: train.epochs: {old} -> "
                f"{self.config.epochs}, but {done} epochs are already trained (epochs may only grow on a resume). "
                f"To start fresh, use --no-resume (replaces that run) or a new --output.")
        old = state.get("config", {}).get("epochs", self.config.epochs)
        if self.config.scheduler == "cosine" and old != self.config.epochs:
            # the cosine schedule spans train.epochs: another length reshapes the part already trained
            raise CheckpointError(
                f"Checkpoint {last} is incompatible with this run: its settings differ: train.epochs: {old} -> "
                f"{self.config.epochs}, and the cosine scheduler's length is train.epochs (the learning rate "
                f"would jump to another curve). Resume with train.epochs={old}; to train longer, start fresh "
                f"with --no-resume (replaces that run) or a new --output, or use scheduler none or plateau, whose "
                f"epochs may grow on a resume.")
        want = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        have = {k: tuple(getattr(v, "shape", ())) for k, v in state["model"].items()}
        if want != have:
            diff = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
            detail = ", ".join(f"{k}: {have.get(k, 'absent')} there, {want.get(k, 'absent')} here" for k in diff[:3])
            raise CheckpointError(
                f"Checkpoint {last} is incompatible with this run: the model differs ({detail}). Use the same model "
                f"settings as the checkpointed run; to start fresh, use --no-resume (replaces that run) or a new "
                f"--output.")
        global_batch = self.config.batch_size * self.world
        saved = state.get("global_batch", global_batch)
        if state["batch"] and saved != global_batch:
            raise CheckpointError(
                f"Checkpoint {last} was written mid-epoch with a global batch of {saved} samples "
                f"(batch_size x ranks) and this run has {global_batch}; the data position cannot be "
                f"restored. Use the same batch_size and number of processes.")
        return state

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        return build_optimizer(c.optimizer, self.method.param_groups(self.model), c.lr, weight_decay=c.weight_decay,
                               momentum=c.momentum)

    def _make_scheduler(self, steps_per_epoch: int):
        c = self.config
        if c.scheduler == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, mode="min", factor=c.plateau_factor,
                                                              patience=c.plateau_patience, min_lr=c.min_lr)
        if c.scheduler == "cosine":
            total = c.epochs * steps_per_epoch
            warm = c.warmup_epochs * steps_per_epoch
            start = (c.warmup_start_lr if c.warmup_start_lr is not None else c.lr) / c.lr
            floor = c.min_lr / c.lr

            def factor(step: int) -> float:
                if step < warm:
                    return start + (1 - start) * step / max(warm, 1)
                progress = (step - warm) / max(total - warm, 1)
                return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

            return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        if c.warmup_epochs > 0:  # scheduler "none": a linear warm-up to lr, then lr
            warm = c.warmup_epochs * steps_per_epoch
            start = c.warmup_start_lr / c.lr
            return torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                     lambda step: start + (1 - start) * min(step / warm, 1.0))
        return None

    def metric_names(self) -> set[str] | None:
        """The names :meth:`evaluate` will return in this run, known before training (to check
        ``select_metric``); ``None`` when they cannot be told.

        The task's metrics come from the metric tracker on one training batch; a split that
        evaluates itself (BraTS) is checked only if it declares ``metric_names`` (BraTS does not yet:
        there, select_metric is checked after the first epoch). A method that reports its own metrics
        (CGGM: ``clf/<modality>``) is asked on a throw-away copy, after one loss on that batch so that
        modules it builds on the first batch exist; the model, the method and the random streams are
        left as they were (the method is always probed through a throw-away copy)."""
        evaluates_itself = hasattr(self.data.val, "eval_metric")
        own = bool(self.method.eval_metrics())
        if evaluates_itself and getattr(self.data.val, "metric_names", None) is None:
            return None
        try:
            batch = next(iter(self._batches("train")), None)
        except Exception:
            return None
        if batch is None:
            return None
        names: set[str] = set(getattr(self.data.val, "metric_names", ()) or ())
        try:
            with self._side_effect_free():
                inputs, masks, target = batch
                # always a throw-away copy: a method may build modules lazily at evaluation (heads),
                # which on the real method would happen here, before seeding, and change the run
                probe = self._method_copy()
                if own:
                    out = self.model(*probe.prepare(inputs, masks))
                    probe.loss(out, target, self.task.loss(out.prediction, target))
                    probe.skip()
                with torch.no_grad():
                    step = EvalStep(self.model, probe, self.task, self.device, tracker=not evaluates_itself)
                    step(inputs, masks, target)
                    names |= set(step.compute())
        except Exception:  # a method that cannot be probed: the selection metric is checked after epoch 1
            return None
        return names

    def _method_copy(self) -> Method:
        """A deep copy of the method that shares the model (its modules, parameters and buffers)
        and the optimizer, so that nothing done to the copy touches them."""
        memo: dict[int, Any] = {id(self.model): self.model, id(self.optimizer): self.optimizer}
        for obj in chain(self.model.modules(), self.model.parameters(), self.model.buffers()):
            memo[id(obj)] = obj
        return copy.deepcopy(self.method, memo)

    @contextlib.contextmanager
    def _side_effect_free(self):
        """A context for a forward pass that must change nothing: evaluation mode (no batch-norm
        statistics move, no dropout), the random streams forked, the method's records kept."""
        training, records = self.model.training, self.method.records()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self.model.eval()
            try:
                yield
            finally:
                self.model.train(training)
                self.method.reset_records()
                for k, v in records.items():
                    self.method.record(k, v)

    # -- data -----------------------------------------------------------------------------------
    def _batches(self, split: str, epoch: int = 0, skip: int = 0, shard: bool = False) -> Iterator:
        dataset = getattr(self.data, split)
        train = split == "train"
        bs = self.config.batch_size if train else self.config.eval_batch_size
        it = BatchIterator(dataset, bs, shuffle=train, seed=self.config.seed, epoch=epoch,
                           rank=self.rank if shard else 0, world_size=self.world if shard else 1, skip=skip)
        for batch in it:
            yield _to(batch, self.device)

    def _epoch_context(self, epoch: int, metrics: dict[str, float] | None = None) -> EpochContext:
        return EpochContext(epoch=epoch, epochs=self.config.epochs, model=self.model, task=self.task,
                            batches=lambda split: self._batches(split, epoch), forward=self.train_model,
                            metrics=metrics or {})

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics of the current model on a whole split, by :func:`cggm.training.evaluation.evaluate`
        (the path the reports and the removal diagnostic use too).

        Under DDP each rank evaluates its shard of the split and the metric states are synced, so
        every rank returns the whole split's metrics. A split dataset with its own
        ``evaluate(model, method, device, batch_size)`` (e.g. BraTS, which scores whole volumes) is
        evaluated by that protocol instead (whole, on every rank).
        """
        return evaluate(self.model, self.method, getattr(self.data, split), self.task, self.device,
                        self.config.eval_batch_size)

    # -- checkpoints ----------------------------------------------------------------------------
    def _state(self, epoch: int, batch: int, extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint, "config": asdict(self.config), "epoch": epoch, "batch": batch,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "method": self.method.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "skipped_steps": self.skipped_steps, "global_batch": self.config.batch_size * self.world, **extra,
        }

    def _save(self, name: str, state: dict[str, Any]) -> None:
        if self.output_dir is not None and distributed.is_main_process():
            save_checkpoint(state, self.output_dir / name)

    def _restore(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state.get("scheduler") is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            self.method.load_state_dict(_to_device(state["method"], self.device))
            rng = state["rng"]
            torch.set_rng_state(rng["torch"].cpu())
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([r.cpu() for r in rng["cuda"]])
        except CheckpointError:
            raise
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            raise CheckpointError(f"Checkpoint {self.last_checkpoint} cannot be restored into this run "
                                  f"({type(err).__name__}: {err}). Use a new output directory or --no-resume.") from err
        self.skipped_steps = int(state.get("skipped_steps", 0))

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> RunResult:
        """Train for ``config.epochs`` epochs (resuming from ``output_dir/last.pt`` when there is one),
        select the checkpoint on validation, evaluate test once on it, and return the :class:`RunResult`."""
        c = self.config
        threads = torch.get_num_threads()
        if c.threads is not None:
            torch.set_num_threads(c.threads)
        main = distributed.is_main_process()
        files = RunFiles(self.output_dir if main else None, c.tensorboard)
        progress = Progress(c.epochs, c.log_interval, enabled=c.progress and main)
        try:
            return self._fit(files, progress)
        finally:
            progress.end_epoch()
            files.close()
            if c.threads is not None:
                torch.set_num_threads(threads)

    def _fit(self, files: RunFiles, progress: Progress) -> RunResult:
        """The loop: each epoch trains (:meth:`_train_epoch`), validates, lets the method end its
        epoch and checkpoints (:meth:`_end_epoch`); then the selected epoch is tested (:meth:`_test`)."""
        c = self.config
        if c.deterministic:
            torch.use_deterministic_algorithms(True)
        seed_everything(c.seed)
        steps_per_epoch = len(BatchIterator(self.data.train, c.batch_size, True, world_size=self.world))
        if steps_per_epoch == 0:
            raise ValueError("The training split yields no batch.")
        self.scheduler = self._make_scheduler(steps_per_epoch)
        run = self._begin_run()
        files.begin(run.history)
        t_start = time.perf_counter()
        for epoch in range(run.start_epoch, c.epochs):
            if run.skip == 0:
                # resuming mid-epoch, the method's restored state already holds what its
                # on_epoch_start computed at the start of this epoch (on the model of that time)
                self.method.begin_epoch(self._epoch_context(epoch))
            self.model.train()
            progress.start_epoch(epoch, steps_per_epoch, run.skip)
            loss_sum, steps, seconds = self._train_epoch(run, epoch, steps_per_epoch, progress)
            progress.end_epoch()
            run.skip = 0
            self._end_epoch(run, epoch, loss_sum, steps, seconds, files)
        return self._test(run, time.perf_counter() - t_start, files)

    def _begin_run(self) -> _Run:
        """A fresh run's bookkeeping, or the resumed checkpoint's."""
        run = _Run()
        state, self._resume_state = self._resume_state, None
        last = self.last_checkpoint
        if state is not None:
            self._restore(state)
            run.start_epoch, run.skip = state["epoch"], state["batch"]
            run.best, run.history, run.records = state["best"], state["history"], state["records"]
            run.partial = state.get("partial", run.partial)
            if run.start_epoch >= self.config.epochs:
                self._log(f"{last} is a finished run ({run.start_epoch} epochs): evaluating test on its selected "
                          f"checkpoint (raise train.epochs to train on)")
            else:
                self._log(f"resumed from {last} at epoch {run.start_epoch}, batch {run.skip}")
        # how many of each record are in the TensorBoard files already: those of the epochs before
        # (a mid-epoch checkpoint holds part of its epoch's records, which are written at its end)
        run.logged = {k: len(v) for k, v in run.records.items()}
        if run.skip and "records_logged" in run.partial:
            run.logged = dict(run.partial["records_logged"])
        return run

    def _train_epoch(self, run: _Run, epoch: int, steps_per_epoch: int, progress: Progress):
        """The epoch's steps (from ``run.skip`` on), with mid-epoch checkpoints; returns the loss sum,
        the steps taken and the seconds spent."""
        c, last = self.config, self.last_checkpoint
        per_step = isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR)
        t_epoch = time.perf_counter()
        epoch_records: dict[str, list[torch.Tensor]] = {}
        loss_sum = torch.zeros((), device=self.device) + run.partial["loss_sum"]
        steps = run.partial["steps"]
        for batch_index, batch in enumerate(self._batches("train", epoch, run.skip, shard=True), start=run.skip):
            loss = self._train_step(*batch, epoch=epoch, batch_index=batch_index, last=last)
            if loss is not None:  # (a skipped step's records describe a step that was not taken)
                loss_sum += loss.detach()
                steps += 1
                for k, v in self.method.records().items():
                    epoch_records.setdefault(k, []).append(v)
            if per_step:
                self.scheduler.step()
            if c.checkpoint_every and (batch_index + 1) % c.checkpoint_every == 0 and batch_index + 1 < steps_per_epoch:
                self._flush(run.records, epoch_records)
                run.partial = {"loss_sum": float(loss_sum), "steps": steps, "records_logged": run.logged,
                               "seconds": run.partial["seconds"] + time.perf_counter() - t_epoch}
                t_epoch = time.perf_counter()
                self._save("last.pt", self._state(epoch, batch_index + 1, {
                    "best": run.best, "history": run.history, "records": run.records, "partial": run.partial}))
            progress.step(batch_index + 1, loss)
            if c.step_delay:
                time.sleep(c.step_delay)
        self._flush(run.records, epoch_records)
        return loss_sum, steps, run.partial["seconds"] + time.perf_counter() - t_epoch

    def _end_epoch(self, run: _Run, epoch: int, loss_sum, steps: int, seconds: float, files: RunFiles) -> None:
        """Validate, let the method end its epoch, select, checkpoint and write the epoch's outputs."""
        val = self.evaluate("val")
        self.method.finish_epoch(self._epoch_context(epoch, val))
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val["loss"])
        row = {"epoch": epoch, "train_loss": float(loss_sum) / max(steps, 1), "seconds": seconds,
               "lr": self.optimizer.param_groups[0]["lr"], **{f"val/{k}": v for k, v in val.items()}}
        run.history.append(row)
        score = val.get(self.select_name)
        if score is None:
            raise KeyError(f"Selection metric {self.select_name!r} is not among the validation metrics {sorted(val)}.")
        best = run.best["metric"]
        if best is None or (score > best if self.select_mode == "max" else score < best):
            run.best = {"metric": score, "epoch": epoch, "val": val}
            run.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            run.best_method = copy.deepcopy(self.method.state_dict())  # the selected run is model and method
            self._save("best.pt", {"fingerprint": self.fingerprint, "epoch": epoch, "model": run.best_weights,
                                   "val": val, "method": run.best_method})
        run.partial = {"loss_sum": 0.0, "steps": 0, "seconds": 0.0}
        self._save("last.pt", self._state(epoch + 1, 0, {"best": run.best, "history": run.history,
                                                          "records": run.records, "partial": run.partial}))
        files.epoch_end(row, run.history, run.records, run.logged)
        run.logged = {k: len(v) for k, v in run.records.items()}
        self._log(self._summary(row))

    def _test(self, run: _Run, seconds: float, files: RunFiles) -> RunResult:
        """Test once, on the epoch selected on validation: its weights and the method's state of that
        epoch (heads, classifiers, statistics), not the last epoch's method state."""
        best_weights, best_method = run.best_weights, run.best_method
        if best_weights is None and self.output_dir is not None and (self.output_dir / "best.pt").exists():
            selected = load_checkpoint(self.output_dir / "best.pt")
            best_weights, best_method = selected["model"], selected.get("method")
        final_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        final_method = copy.deepcopy(self.method.state_dict())
        if best_weights is not None:
            self.model.load_state_dict(best_weights)
            if best_method is not None:
                self.method.load_state_dict(_to_device(best_method, self.device))
        test = self.evaluate("test")
        history = run.history
        result = RunResult(best_epoch=run.best["epoch"], val=run.best["val"], test=test, history=history,
                           records=run.records, skipped_steps=self.skipped_steps, seconds=seconds,
                           seconds_per_epoch=float(np.mean([h["seconds"] for h in history])) if history else 0.0,
                           output_dir=None if self.output_dir is None else str(self.output_dir),
                           extra={"final_weights": final_weights, "final_method": final_method})
        if self.output_dir is not None and distributed.is_main_process():
            write_json(self.output_dir / "result.json", {k: v for k, v in result.to_json().items() if k != "extra"})
            files.end(history, run.records)
        return result

    def _train_step(self, inputs, masks, target, epoch: int, batch_index: int, last) -> torch.Tensor | None:
        c = self.config
        try:
            result = train_step(self.method, self.optimizer, (inputs, masks, target), forward=self.train_model,
                                clip_grad_norm=c.clip_grad_norm, on_nonfinite=c.on_nonfinite,
                                where=f" (epoch {epoch}, batch {batch_index})")
        except NonFiniteError as err:
            kept = f" The last good checkpoint is kept at {last}." if last is not None and last.exists() else ""
            raise NonFiniteError(f"{err}{kept} Lower the learning rate, enable clip_grad_norm, or set "
                                 f"on_nonfinite='skip'.") from None
        if result.skipped:
            self.skipped_steps += 1
            self._log(f"skipped non-finite {result.message} (skipped so far: {self.skipped_steps})")
            return None
        return result.loss

    @staticmethod
    def _flush(records: dict[str, list[float]], epoch_records: dict[str, list[torch.Tensor]]) -> None:
        for k, vals in epoch_records.items():
            records.setdefault(k, []).extend(torch.stack(vals).float().cpu().tolist())
        epoch_records.clear()

    # -- output ---------------------------------------------------------------------------------
    def _log(self, msg: str) -> None:
        if self.config.progress and distributed.is_main_process():
            print(msg, file=sys.stderr, flush=True)

    def _summary(self, row: dict[str, Any]) -> str:
        parts = [f"epoch {row['epoch'] + 1}/{self.config.epochs}", f"train_loss {row['train_loss']:.4f}"]
        parts += [f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val/") and isinstance(v, float)]
        return " | ".join(parts)


def _to_device(obj: Any, device: torch.device) -> Any:
    """Tensors in nested dicts, lists and tuples moved to ``device`` (a method's saved state).
    Optimizer state dicts are left as they are: ``Optimizer.load_state_dict`` places their tensors
    (and keeps Adam's step counters on the host, as it wants them)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict) and {"state", "param_groups"} <= set(obj):
        return obj
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def train(model: nn.Module, method: Method, data: DataSplits, config: TrainConfig | None = None,
          output_dir: str | Path | None = None, **kwargs: Any) -> RunResult:
    """Convenience wrapper: ``Trainer(...).fit()``."""
    return Trainer(model, method, data, config, output_dir, **kwargs).fit()
