"""The task's evaluation metrics, accumulated on the device with torchmetrics and synced across
DDP ranks at :meth:`MetricTracker.compute` (each rank updates with its shard of the split).

Every metric declares whether higher is better (torchmetrics' ``higher_is_better``). The
definitions are those of :mod:`cggm.metrics.functional` (kept as the reference); where
torchmetrics' own definition differs, the state comes from torchmetrics and the final formula is
ours:

* ``f1_macro``: torchmetrics' macro F1 leaves out classes absent from both predictions and targets;
  ours (and scikit-learn's with ``labels=range(C)``) counts them as 0. Computed from torchmetrics'
  per-class stat scores with our formula (:class:`MacroF1`).
* ``dice_class<c>`` / ``dice_mean`` (2D slices): per-sample hard Dice with an empty class scoring 1
  (:func:`cggm.metrics.dice.hard_dice`), averaged over samples; torchmetrics' ``DiceScore`` scores empty
  classes differently. The per-sample Dice is ours, the accumulation and sync torchmetrics'
  (:class:`SampleMeanDice`).
* ``acc2_nonzero`` / ``f1_nonzero``: NaN when no label is non-zero (torchmetrics would give 0).

Which metrics a task reports is its kind's :class:`MetricSet` (``Task.spec.metrics``: the task
decides); this module knows no task kind.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassStatScores
from torchmetrics.regression import MeanAbsoluteError, PearsonCorrCoef

from .dice import hard_dice

_IGNORE = -1  # target of the samples a metric leaves out (MOSI's zero labels for the "non-zero" metrics)


def selection_metric(task) -> tuple[str, str]:
    """The validation metric used to select the checkpoint, and ``max`` or ``min`` (the task's headline)."""
    return task.headline.name, task.headline.mode


class MeanLoss(Metric):
    """The mean loss over samples (each batch's mean loss weighted by its size; a NaN loss stays NaN:
    torchmetrics' ``MeanMetric`` drops NaNs, or with ``nan_strategy='disable'`` drops the weights)."""

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: Tensor, n: int) -> None:
        self.total += value.detach().to(self.total.dtype) * n
        self.count += n

    def compute(self) -> Tensor:
        return self.total / self.count


class Pearson(PearsonCorrCoef):
    """Pearson correlation (NaN when either side is constant, as :func:`~cggm.metrics.functional.pearson`)."""

    higher_is_better = True


class MacroF1(MulticlassStatScores):
    """F1 averaged over all ``num_classes`` classes, a class absent from predictions and targets
    counting 0 (:func:`cggm.metrics.functional.macro_f1`)."""

    higher_is_better = True
    is_differentiable = False

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(num_classes=num_classes, average=None, **kwargs)

    def compute(self) -> Tensor:
        tp, fp, _tn, fn = self._final_state()
        denom = 2 * tp + fp + fn
        f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(denom, dtype=torch.float64))
        return f1.double().mean()


class SampleMeanDice(Metric):
    """Per-class hard Dice of each sample (:func:`cggm.metrics.dice.hard_dice`), averaged over samples:
    ``[num_classes - 1]`` (foreground classes)."""

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("total", torch.zeros(num_classes - 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, labels: Tensor, target: Tensor) -> None:
        n = int(target.shape[0])
        if n == 0:
            return
        per = torch.stack([hard_dice(labels[i], target[i], self.num_classes) for i in range(n)])
        self.total += per.sum(0).to(self.total.dtype)
        self.count += n

    def compute(self) -> Tensor:
        return self.total / self.count


def _metric_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


class MetricSet:
    """The metrics of one task kind: built once, fed each batch, finished into floats. The base
    reports each built metric whose name does not start with ``_`` under its own name."""

    def __init__(self, num_outputs: int) -> None:
        self.num_outputs = num_outputs

    def build(self, kw: dict, cls: dict, agg: dict) -> dict[str, Metric]:
        raise NotImplementedError

    def directions(self, metrics: dict[str, Metric]) -> dict[str, bool]:
        return {k: bool(v.higher_is_better) for k, v in metrics.items() if k != "loss" and not k.startswith("_")}

    def update(self, m: dict[str, Metric], prediction: Tensor, target: Tensor, n: int, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def finish(self, values: dict[str, Tensor], total: float) -> dict[str, float]:
        return {k: float(v) for k, v in values.items()}


class ClassificationMetrics(MetricSet):
    """``accuracy``, ``f1_weighted``, ``f1_macro`` of the argmax labels."""

    def build(self, kw, cls, agg):
        c = self.num_outputs
        return {"accuracy": MulticlassAccuracy(c, average="micro", **cls),
                "f1_weighted": MulticlassF1Score(c, average="weighted", **cls), "f1_macro": MacroF1(c, **cls)}

    def update(self, m, prediction, target, n, dtype):
        labels, target = prediction.argmax(dim=1), target.long()
        for k in ("accuracy", "f1_weighted", "f1_macro"):
            m[k].update(labels, target)


class RegressionMetrics(MetricSet):
    """CMU-MOSI's: ``mae``, ``corr``, ``acc7``, ``acc2_nonneg``, ``f1_nonneg``, ``acc2_nonzero``,
    ``f1_nonzero`` of the first output (:func:`cggm.metrics.functional.sentiment_metrics`)."""

    def build(self, kw, cls, agg):
        return {"mae": MeanAbsoluteError(**kw), "corr": Pearson(**kw),
                "acc7": MulticlassAccuracy(7, average="micro", **cls),
                "acc2_nonneg": MulticlassAccuracy(2, average="micro", **cls),
                "f1_nonneg": MulticlassF1Score(2, average="weighted", **cls),
                "acc2_nonzero": MulticlassAccuracy(2, average="micro", ignore_index=_IGNORE, **cls),
                "f1_nonzero": MulticlassF1Score(2, average="weighted", ignore_index=_IGNORE, **cls),
                "_nonzero": SumMetric(**agg)}

    def update(self, m, prediction, target, n, dtype):
        p = prediction.detach().reshape(n, -1)[:, 0].to(dtype)
        t = target.detach().reshape(n, -1)[:, 0].to(dtype)
        m["mae"].update(p, t)
        m["corr"].update(p, t)
        m["acc7"].update(p.round().clamp(-3, 3).long() + 3, t.round().clamp(-3, 3).long() + 3)
        m["acc2_nonneg"].update((p >= 0).long(), (t >= 0).long())
        m["f1_nonneg"].update((p >= 0).long(), (t >= 0).long())
        nz = t != 0
        t_nz = torch.where(nz, (t > 0).long(), torch.full_like(t, _IGNORE, dtype=torch.long))
        m["acc2_nonzero"].update((p > 0).long(), t_nz)
        m["f1_nonzero"].update((p > 0).long(), t_nz)
        m["_nonzero"].update(nz.to(dtype).sum())

    def finish(self, values, total):
        if float(values.pop("_nonzero")) == 0:
            values["acc2_nonzero"] = values["f1_nonzero"] = torch.tensor(math.nan)
        if total < 2:
            values["corr"] = torch.tensor(math.nan)
        return super().finish(values, total)


class SegmentationMetrics(MetricSet):
    """``dice_class<c>`` per foreground class and their ``dice_mean`` (2D slices, per-sample Dice
    averaged over samples; volume-level Dice is :class:`cggm.metrics.volume.VolumeDice`)."""

    def build(self, kw, cls, agg):
        return {"_dice": SampleMeanDice(self.num_outputs, **kw)}

    def directions(self, metrics):
        return {**{f"dice_class{c}": True for c in range(1, self.num_outputs)}, "dice_mean": True}

    def update(self, m, prediction, target, n, dtype):
        m["_dice"].update(prediction.argmax(dim=1), target)

    def finish(self, values, total):
        d = values.pop("_dice").double().cpu()
        out = {f"dice_class{c}": float(v) for c, v in enumerate(d.tolist(), start=1)}
        out["dice_mean"] = float(d.mean())
        return out


class MetricTracker:
    """Collects one evaluation pass of a task: ``update(prediction, target, loss)`` per batch and
    ``compute()`` once, a dict of floats (``loss`` first). Under DDP (an initialised process group
    with ``sync=True``) each rank updates with its own samples and ``compute()`` (a collective:
    every rank calls it) returns the metrics of all ranks' samples together.

    classification: ``accuracy``, ``f1_weighted``, ``f1_macro``. regression (CMU-MOSI conventions,
    :func:`cggm.metrics.functional.sentiment_metrics`): ``mae``, ``corr``, ``acc7``,
    ``acc2_nonneg``, ``f1_nonneg``, ``acc2_nonzero``, ``f1_nonzero``. segmentation (2D slices;
    volume-level Dice: :class:`cggm.metrics.volume.VolumeDice`): ``dice_class<c>`` and ``dice_mean``.
    :attr:`higher_is_better` says each name's direction."""

    def __init__(self, task, device: torch.device | str | None = None, sync: bool = True):
        self.task = task
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        kw = {"sync_on_compute": sync, "dist_sync_on_step": False}
        cls = {"validate_args": False, **kw}
        agg = {"nan_strategy": "disable", **kw}  # a NaN loss stays NaN (a diverged model must show)
        self.set: MetricSet = task.spec.metrics(task.num_outputs)
        self.metrics: dict[str, Metric] = {"loss": MeanLoss(**kw), "_count": SumMetric(**agg)}
        self.metrics.update(self.set.build(kw, cls, agg))
        self._placed = False
        self.count = 0

    @property
    def higher_is_better(self) -> dict[str, bool]:
        """Each reported metric's direction."""
        return {"loss": bool(self.metrics["loss"].higher_is_better), **self.set.directions(self.metrics)}

    def _place(self, device: torch.device) -> None:
        if not self._placed or device != self.device:
            self.device = device
            dtype = _metric_dtype(device)
            for metric in self.metrics.values():
                metric.to(device)
                metric.set_dtype(dtype)
            self._placed = True

    def update(self, prediction: Tensor, target: Tensor, loss: Tensor | None = None) -> None:
        self._place(prediction.device)
        n = int(target.shape[0])
        self.count += n
        m = self.metrics
        dtype = _metric_dtype(prediction.device)
        with torch.no_grad():
            if loss is not None:
                m["loss"].update(loss.detach().to(dtype), n)
            if n == 0:
                return
            m["_count"].update(torch.full((), float(n), dtype=dtype, device=prediction.device))
            self.set.update(m, prediction, target, n, dtype)

    def reset(self) -> MetricTracker:
        """Forget every sample seen, keeping the metrics built and placed (building them costs
        several milliseconds, more than evaluating a small split)."""
        for metric in self.metrics.values():
            metric.reset()
        self.count = 0
        return self

    def compute(self) -> dict[str, float]:
        """The metrics of every sample seen (all ranks' under DDP): a collective when synced."""
        out: dict[str, float] = {}
        with warnings.catch_warnings():  # "compute before update", constant inputs of Pearson: handled below
            warnings.simplefilter("ignore")
            values = {k: v.compute() for k, v in self.metrics.items()}
        loss_n, total = float(self.metrics["loss"].count), float(values.pop("_count"))
        out["loss"] = float(values.pop("loss")) if loss_n > 0 else 0.0  # (no loss given counts 0, as before)
        if total == 0:
            return out
        out.update(self.set.finish(values, total))
        return out
