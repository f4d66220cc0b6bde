"""Task metrics (pure functions) and the per-task metric collection used at evaluation."""

# (the tracker first: it imports the submodule cggm.metrics.dice, which would otherwise replace the
# function ``dice`` below as the package's attribute ``cggm.metrics.dice``)
from .tracker import MetricTracker, selection_metric  # isort: skip
from .dice import hard_dice  # isort: skip
from .functional import accuracy, brats_dice, dice, macro_f1, mae, pearson, sentiment_metrics, weighted_f1  # isort: skip

__all__ = [
    "MetricTracker", "accuracy", "brats_dice", "dice", "hard_dice", "mae", "macro_f1", "pearson", "selection_metric",
    "sentiment_metrics", "weighted_f1",
]
