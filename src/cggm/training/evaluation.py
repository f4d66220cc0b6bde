"""The one evaluation path: the engine (:meth:`Trainer.evaluate`), the removal diagnostic and the
reports (:func:`cggm.report.evaluate_with`) all score a model on a split here.

* A split with its own protocol declares its metric and its batches: ``dataset.eval_metric()``
  replaces the task's metrics (BraTS: :class:`cggm.metrics.volume.VolumeDice`, whole volumes) and
  ``dataset.eval_batches(batch_size)`` gives the batches in the order that metric needs; they go
  through the same :class:`EvalStep`. Under DDP such a split is evaluated whole by every rank.
* Any other split goes batch by batch through the method's evaluation path (:class:`EvalStep`:
  ``prepare_eval``, the forward pass, ``eval_prediction``, ``eval_metrics``) into the task's metrics
  (:meth:`cggm.types.Task.metrics`). Under DDP each rank evaluates its shard (samples ``rank,
  rank + world, ...``, no padding, so each sample counts once) and the metric states are synced
  across ranks, so every rank returns the metrics of the whole split.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import distributed
from ..data.base import BatchIterator
from ..types import Task

#: replaces a batch's inputs before the method's ``prepare_eval`` (e.g. one modality by its mean)
Transform = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@torch.no_grad()
def evaluate(model: nn.Module, method, dataset, task: Task, device: torch.device | str, batch_size: int,
             transform: Transform | None = None, shard: bool = True) -> dict[str, float]:
    """Metrics of ``model`` (through the bound ``method``) on ``dataset``, a dict of floats with
    ``loss`` and the task's metrics (plus the method's ``eval_metrics``).

    ``transform`` maps each batch's inputs (on ``device``) before ``prepare_eval``. ``shard``:
    under DDP, split the samples across ranks and sync the metrics (every rank must call this);
    ``False`` evaluates the whole split in this process alone. The model's train/eval mode is
    restored on return."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        if hasattr(dataset, "eval_metric"):  # the split's own protocol, whole on every rank
            step = EvalStep(model, method, task, device, metric=dataset.eval_metric())
            batches = dataset.eval_batches(batch_size)
        else:
            world = distributed.world_size() if shard else 1
            rank = distributed.rank() if world > 1 else 0
            step = EvalStep(model, method, task, device, sync=world > 1)
            batches = BatchIterator(dataset, batch_size, shuffle=False, rank=rank, world_size=world, pad=False)
        for inputs, masks, target in batches:
            inputs = {m: x.to(device, non_blocking=True) for m, x in inputs.items()}
            masks = {m: v.to(device, non_blocking=True) for m, v in masks.items()}
            target = target.to(device, non_blocking=True)
            step(inputs if transform is None else transform(inputs), masks, target)
        return step.compute()
    finally:
        model.train(was_training)


class EvalStep:
    """The one per-batch evaluation sequence (the engine, the Lightning module, BraTS's volumes and
    the diagnostics all score batches here): the method's ``prepare_eval``, the forward pass, the
    method's ``eval_prediction`` into the task's metrics (``tracker=False``: none; ``metric``: a
    split's own metric instead, fed ``(prediction, target, loss)`` like the task's) and the
    method's own ``eval_metrics``, updated with ``(out, target)`` (``method_metrics=False``: none; a
    target may then be None, for predictions only)."""

    def __init__(self, model: nn.Module, method, task: Task, device: torch.device | str, sync: bool = False,
                 tracker: bool = True, metric=None, method_metrics: bool = True) -> None:
        self.model, self.method, self.task = model, method, task
        if metric is not None:
            self.tracker = metric.reset()
        else:
            self.tracker = _tracker(task, torch.device(device), sync) if tracker else None
        self.extra = dict(method.eval_metrics()) if method_metrics else {}
        for name, metric in self.extra.items():
            if hasattr(metric, "to"):
                self.extra[name] = metric = metric.to(device)
            metric.reset()

    def __call__(self, inputs, masks, target):
        """Score one batch; returns the model's output and the scored prediction."""
        inputs, masks = self.method.prepare_eval(inputs, masks)
        out = self.model(inputs, masks)
        pred = self.method.eval_prediction(out)
        if self.tracker is not None:
            self.tracker.update(pred, target, self.task.loss(pred, target))
        for metric in self.extra.values():
            metric.update(out, target)
        return out, pred

    def compute(self) -> dict[str, float]:
        """The task's metrics and the method's own (``name/key`` for a metric that gives a mapping)."""
        metrics = self.tracker.compute() if self.tracker is not None else {}
        for name, metric in self.extra.items():
            value = metric.compute()
            if isinstance(value, dict):
                metrics.update({(f"{name}/{k}" if name else k): float(v) for k, v in value.items()})
            else:
                metrics[name] = float(value)
        return metrics


_TRACKERS: dict = {}


def _tracker(task, device: torch.device, sync: bool):
    """A reset tracker of ``task``'s metrics on ``device``, reused across evaluations."""
    key = (task, str(device), sync)
    tracker = _TRACKERS.get(key)
    if tracker is None:
        if len(_TRACKERS) > 32:
            _TRACKERS.clear()
        tracker = _TRACKERS[key] = task.metrics(device=device, sync=sync)
    return tracker.reset()


def replace_inputs(fill: dict[str, torch.Tensor]) -> Transform:
    """A transform that replaces the input of each modality in ``fill`` by the given per-sample
    tensor, broadcast to every sample of the batch (the removal diagnostic's training mean)."""

    def transform(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: (fill[m].to(x.device, x.dtype).expand_as(x) if m in fill else x) for m, x in inputs.items()}

    return transform
