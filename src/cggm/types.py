"""The small data types every part of cggm shares.

A model returns a :class:`ModelOutput`: the fused prediction and, for each modality, the feature
tensor ``h_i`` that the fusion module consumed (Eq. 1 of the CGGM paper). Methods never look up
parameters by name; they act on these features, or on the per-modality parameter lists a
:class:`~cggm.models.MultimodalModel` declares.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from .metrics.dice import hard_dice, soft_dice_loss
from .metrics.tracker import ClassificationMetrics, MetricSet, MetricTracker, RegressionMetrics, SegmentationMetrics

TaskKind = Literal["classification", "regression", "segmentation"]

# class-weight tensors by (weights, device, dtype), shared by equal tasks: a loss call builds none
# (no host-to-device copy per step), and Task keeps no tensor (equality, hashing, pickling unchanged)
_WEIGHT_TENSORS: dict[tuple[tuple[float, ...], torch.device, torch.dtype], Tensor] = {}


@dataclass
class ModelOutput:
    """What a multimodal model returns.

    prediction: logits ``[B, C]`` (classification), values ``[B, 1]`` (regression) or logits
        ``[B, C, H, W]`` (segmentation).
    features: one tensor per modality, in the model's modality order, exactly as the fusion module
        consumed it: ``[B, D]`` vectors, ``[B, T, D]`` token sequences or ``[B, C, H, W]`` maps.
    masks: optional per-modality padding masks for sequence features, ``[B, T]`` bool with True
        on real tokens (``None`` where a modality has no padding).
    """

    prediction: Tensor
    features: list[Tensor]
    masks: list[Tensor | None] | None = None

    def mask(self, i: int) -> Tensor | None:
        return None if self.masks is None else self.masks[i]


@dataclass(frozen=True)
class Headline:
    """The metric a task is judged by (checkpoint selection, reports, diagnostics) and its direction."""

    name: str
    higher_is_better: bool

    @property
    def mode(self) -> str:
        """``max`` or ``min``: what a better value is."""
        return "max" if self.higher_is_better else "min"

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b


def _class_loss(task: Task, prediction: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(prediction, target, weight=task._weights(prediction))


def _value_loss(task: Task, prediction: Tensor, target: Tensor) -> Tensor:
    return F.l1_loss(prediction.reshape(target.shape), target.to(prediction.dtype))


def _dice_ce_loss(task: Task, prediction: Tensor, target: Tensor) -> Tensor:
    ce = F.cross_entropy(prediction, target, weight=task._weights(prediction))
    return soft_dice_loss(prediction, target) + task.dice_ce_weight * ce


def _accuracy(task: Task, prediction: Tensor, target: Tensor) -> Tensor:
    return (prediction.argmax(dim=1) == target).float().mean()


def _value_metric(task: Task, prediction: Tensor, target: Tensor) -> Tensor:
    pred = prediction.reshape(target.shape).float()
    if task.regression_metric == "sign_accuracy":
        return ((pred > 0) == (target > 0)).float().mean()
    return -(pred - target.float()).abs().mean()


def _mean_dice(task: Task, prediction: Tensor, target: Tensor) -> Tensor:
    return hard_dice(prediction.argmax(dim=1), target, task.num_outputs).mean()


@dataclass(frozen=True)
class KindSpec:
    """What a task kind does: every decision that depends on the kind is a field here, and code
    elsewhere asks the :class:`Task` (``task.spec``, or its properties) instead of comparing kinds.

    loss / metric: the task loss and the classifier metric epsilon (higher is better) of a batch,
        as functions of the task, the prediction and the target.
    headline / summary_metrics: the metric the task is judged by, and those a summary line shows.
    metrics: the :class:`~cggm.metrics.tracker.MetricSet` of its evaluation metrics.
    min_outputs: the fewest ``num_outputs`` it accepts (2 classes where targets are class ids).
    class_ids: targets are integer class ids (cross-entropy, class weights, labels checked).
    labels: the prediction is one class per sample (logits ``[B, C]``): accuracy, chance level,
        several predictions scored in one argmax.
    spatial: targets are maps ``[B, H, W]`` and predictions logits ``[B, C, H, W]`` (auxiliary
        classifiers decode to the target's size; features are maps, which no linear probe reads).
    signed: predictions are real values whose sign means something (sign accuracy applies).
    """

    name: str
    loss: Callable[[Task, Tensor, Tensor], Tensor]
    metric: Callable[[Task, Tensor, Tensor], Tensor]
    headline: Headline
    summary_metrics: tuple[str, ...]
    metrics: type[MetricSet]
    min_outputs: int
    class_ids: bool = False
    labels: bool = False
    spatial: bool = False
    signed: bool = False


#: the task kinds and what each does
KINDS: dict[str, KindSpec] = {spec.name: spec for spec in (
    KindSpec("classification", _class_loss, _accuracy, Headline("accuracy", True), ("accuracy", "f1_weighted"),
             ClassificationMetrics, min_outputs=2, class_ids=True, labels=True),
    KindSpec("regression", _value_loss, _value_metric, Headline("mae", False), ("mae", "corr", "acc2_nonzero"),
             RegressionMetrics, min_outputs=1, signed=True),
    KindSpec("segmentation", _dice_ce_loss, _mean_dice, Headline("dice_mean", True), ("dice_mean",),
             SegmentationMetrics, min_outputs=2, class_ids=True, spatial=True),
)}
TASK_KINDS: tuple[str, ...] = tuple(KINDS)


@dataclass(frozen=True)
class Task:
    """What is predicted, and so which loss and which classifier metric are used.

    kind: ``classification``, ``regression`` or ``segmentation``.
    num_outputs: classes (classification, segmentation, background included) or regression
        outputs (usually 1).
    class_weights: optional weights of the cross-entropy (classification and segmentation), one per
        class; stored as a tuple of floats.
    regression_metric: the higher-is-better metric epsilon used for regression classifiers:
        ``neg_mae`` (-MAE, the paper's MAE made higher-is-better) or ``sign_accuracy`` (what the
        official code uses on CMU-MOSI, with zero labels counted as negative).
    """

    kind: TaskKind = "classification"
    num_outputs: int = 2
    class_weights: tuple[float, ...] | None = None
    regression_metric: Literal["neg_mae", "sign_accuracy"] = "neg_mae"
    dice_ce_weight: float = 1.0

    def __post_init__(self) -> None:
        if KINDS.get(self.kind) is None:
            raise ValueError(f"Task kind must be one of {TASK_KINDS}, got {self.kind!r}.")
        if int(self.num_outputs) < 1:
            raise ValueError(f"Task num_outputs must be >= 1, got {self.num_outputs}.")
        if self.num_outputs < self.spec.min_outputs:
            raise ValueError(f"A {self.kind} task needs num_outputs >= 2 classes, got {self.num_outputs}.")
        if self.class_weights is not None:
            weights = tuple(float(w) for w in self.class_weights)
            if len(weights) != self.num_outputs:
                raise ValueError(f"Task class_weights has {len(weights)} values for {self.num_outputs} outputs; "
                                 f"give one weight per class.")
            object.__setattr__(self, "class_weights", weights)  # hashable, and equal whatever sequence it came as
        if self.regression_metric not in ("neg_mae", "sign_accuracy"):
            raise ValueError(
                f"regression_metric must be 'neg_mae' or 'sign_accuracy', got {self.regression_metric!r}."
            )

    # -- what the kind decides ----------------------------------------------------------------------
    @property
    def spec(self) -> KindSpec:
        """This task's kind and what it does (:data:`KINDS`)."""
        return KINDS[self.kind]

    def one_of(self, kinds) -> bool:
        """Whether this task's kind is among ``kinds`` (what a model, method or dataset supports)."""
        return self.kind in kinds

    @property
    def class_ids(self) -> bool:
        """Targets are integer class ids (classification, segmentation)."""
        return self.spec.class_ids

    @property
    def labels(self) -> bool:
        """The prediction is one class per sample, logits ``[B, C]`` (classification)."""
        return self.spec.labels

    @property
    def signed(self) -> bool:
        """Predictions are real values whose sign means something (regression)."""
        return self.spec.signed

    @property
    def probes(self) -> bool:
        """Whether a linear probe can read this task's features (vectors, not maps)."""
        return not self.spec.spatial

    @property
    def chance(self) -> float:
        """The accuracy of a uniform guess among the classes (NaN where predictions are not labels)."""
        return 1.0 / self.num_outputs if self.spec.labels else math.nan

    def target_size(self, target: Tensor) -> tuple[int, int] | None:
        """The spatial size ``(H, W)`` a prediction of ``target`` must have (maps), else ``None``."""
        return tuple(target.shape[-2:]) if self.spec.spatial else None

    # -- losses -------------------------------------------------------------------------------
    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        """The task loss: cross-entropy, L1 (as the paper uses on MOSI), or soft Dice + CE."""
        return self.spec.loss(self, prediction, target)

    def _weights(self, prediction: Tensor) -> Tensor | None:
        """The class weights on the prediction's device and dtype, built once per (device, dtype)."""
        if self.class_weights is None:
            return None
        key = (self.class_weights, prediction.device, prediction.dtype)
        weights = _WEIGHT_TENSORS.get(key)
        if weights is None:
            with torch.inference_mode(False):  # first built under inference_mode, it must still serve training
                weights = torch.tensor(self.class_weights, dtype=prediction.dtype, device=prediction.device)
            _WEIGHT_TENSORS[key] = weights
        return weights

    # -- the classifier metric epsilon (higher is better) ---------------------------------------
    def batch_metric(self, prediction: Tensor, target: Tensor) -> Tensor:
        """Epsilon of the CGGM paper on one batch, as a 0-d tensor on the prediction's device.

        classification: accuracy. regression: -MAE (default) or sign accuracy.
        segmentation: mean Dice over the foreground classes. No host synchronisation.
        """
        with torch.no_grad():
            return self.spec.metric(self, prediction, target)

    def batch_metrics(self, predictions: list[Tensor], target: Tensor) -> Tensor:
        """:meth:`batch_metric` of several predictions of the same target, as an ``[M]`` tensor
        (classification predictions of one shape in a single argmax)."""
        if self.spec.labels and len({p.shape for p in predictions}) == 1:
            with torch.no_grad():
                return (torch.stack(predictions).argmax(dim=2) == target).float().flatten(1).mean(dim=1)
        return torch.stack([self.batch_metric(p, target) for p in predictions])

    # -- evaluation metrics ------------------------------------------------------------------------
    @property
    def headline(self) -> Headline:
        """The metric this task is judged by, with its direction: accuracy (higher), MAE (lower) or
        mean Dice (higher). Checkpoint selection, reports, the runner and the diagnostics read it."""
        return self.spec.headline

    @property
    def summary_metrics(self) -> tuple[str, ...]:
        """The metrics a one-line summary of a run shows (the headline first)."""
        return self.spec.summary_metrics

    def metrics(self, device: torch.device | str | None = None, sync: bool = True):
        """A fresh :class:`~cggm.metrics.MetricTracker` of this task's evaluation metrics (torchmetrics,
        on ``device``; synced across DDP ranks at ``compute()`` when ``sync``)."""
        return MetricTracker(self, device=device, sync=sync)

    def higher_is_better(self, name: str) -> bool:
        """The direction of a metric of this task by name: the task's metrics declare theirs; other
        names (a method's ``clf/<m>``, a split's own ``dice_<region>``) are higher-is-better unless
        they are a loss or an error (``loss``, ``*loss``, ``mae``)."""
        declared = self.metrics(sync=False).higher_is_better
        if name in declared:
            return declared[name]
        return not (name in ("loss", "mae") or name.endswith("loss") or name.endswith("mae"))

    @property
    def higher_is_better_selection(self) -> bool:
        return self.headline.higher_is_better


__all__ = ["KINDS", "TASK_KINDS", "Headline", "KindSpec", "ModelOutput", "Task", "TaskKind", "hard_dice",
           "soft_dice_loss"]
