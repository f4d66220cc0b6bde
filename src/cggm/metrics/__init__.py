"""Task metrics (pure functions) and the per-task metric collection used at evaluation."""

from .functional import accuracy, brats_dice, dice, macro_f1, mae, pearson, sentiment_metrics, weighted_f1
from .tracker import MetricTracker, selection_metric

__all__ = [
    "MetricTracker", "accuracy", "brats_dice", "dice", "mae", "macro_f1", "pearson", "selection_metric",
    "sentiment_metrics", "weighted_f1",
]
