"""The small data types every part of cggm shares.

A model returns a :class:`ModelOutput`: the fused prediction and, for each modality, the feature
tensor ``h_i`` that the fusion module consumed (Eq. 1 of the CGGM paper). Methods never look up
parameters by name; they act on these features, or on the per-modality parameter lists a
:class:`~cggm.models.MultimodalModel` declares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

TaskKind = Literal["classification", "regression", "segmentation"]
TASK_KINDS: tuple[str, ...] = ("classification", "regression", "segmentation")

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


#: per task kind: the headline metric, and the metrics a summary line shows
_HEADLINES = {"classification": Headline("accuracy", True), "regression": Headline("mae", False),
              "segmentation": Headline("dice_mean", True)}
_SUMMARY_METRICS = {"classification": ("accuracy", "f1_weighted"), "regression": ("mae", "corr", "acc2_nonzero"),
                    "segmentation": ("dice_mean",)}


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
        if self.kind not in TASK_KINDS:
            raise ValueError(f"Task kind must be one of {TASK_KINDS}, got {self.kind!r}.")
        if int(self.num_outputs) < 1:
            raise ValueError(f"Task num_outputs must be >= 1, got {self.num_outputs}.")
        if self.kind in ("classification", "segmentation") and self.num_outputs < 2:
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

    # -- losses -------------------------------------------------------------------------------
    def loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        """The task loss: cross-entropy, L1 (as the paper uses on MOSI), or soft Dice + CE."""
        if self.kind == "classification":
            return F.cross_entropy(prediction, target, weight=self._weights(prediction))
        if self.kind == "regression":
            return F.l1_loss(prediction.reshape(target.shape), target.to(prediction.dtype))
        ce = F.cross_entropy(prediction, target, weight=self._weights(prediction))
        return soft_dice_loss(prediction, target) + self.dice_ce_weight * ce

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
            if self.kind == "classification":
                return (prediction.argmax(dim=1) == target).float().mean()
            if self.kind == "regression":
                pred = prediction.reshape(target.shape).float()
                if self.regression_metric == "sign_accuracy":
                    return ((pred > 0) == (target > 0)).float().mean()
                return -(pred - target.float()).abs().mean()
            return hard_dice(prediction.argmax(dim=1), target, self.num_outputs).mean()

    def batch_metrics(self, predictions: list[Tensor], target: Tensor) -> Tensor:
        """:meth:`batch_metric` of several predictions of the same target, as an ``[M]`` tensor
        (classification predictions of one shape in a single argmax)."""
        if self.kind == "classification" and len({p.shape for p in predictions}) == 1:
            with torch.no_grad():
                return (torch.stack(predictions).argmax(dim=2) == target).float().flatten(1).mean(dim=1)
        return torch.stack([self.batch_metric(p, target) for p in predictions])

    # -- evaluation metrics ------------------------------------------------------------------------
    @property
    def headline(self) -> Headline:
        """The metric this task is judged by, with its direction: accuracy (higher), MAE (lower) or
        mean Dice (higher). Checkpoint selection, reports, the runner and the diagnostics read it."""
        return _HEADLINES[self.kind]

    @property
    def summary_metrics(self) -> tuple[str, ...]:
        """The metrics a one-line summary of a run shows (the headline first)."""
        return _SUMMARY_METRICS[self.kind]

    def metrics(self, device: torch.device | str | None = None, sync: bool = True):
        """A fresh :class:`~cggm.metrics.MetricTracker` of this task's evaluation metrics (torchmetrics,
        on ``device``; synced across DDP ranks at ``compute()`` when ``sync``)."""
        from .metrics.tracker import MetricTracker

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


def soft_dice_loss(logits: Tensor, target: Tensor, eps: float = 1e-5) -> Tensor:
    """1 - mean soft Dice over the foreground classes (class 0 is background)."""
    num_classes = logits.shape[1]
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target.long(), num_classes).movedim(-1, 1).to(probs.dtype)
    dims = tuple(range(2, logits.ndim))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)  # [B, C]
    return 1 - dice[:, 1:].mean()


def hard_dice(pred: Tensor, target: Tensor, num_classes: int, empty: float = 1.0) -> Tensor:
    """Per-class Dice of hard labels over the whole batch (all pixels pooled): shape ``[num_classes - 1]``.

    A class absent from both prediction and target scores ``empty`` (1 by convention).
    """
    scores = []
    for c in range(1, num_classes):
        p = pred == c
        t = target == c
        inter = (p & t).sum().float()
        total = p.sum().float() + t.sum().float()
        scores.append(torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.full_like(total, empty)))
    return torch.stack(scores)
