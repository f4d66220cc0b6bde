"""Task metrics as pure functions of predictions and targets (numpy in, floats out), and the
summary of a metric over seeds (mean, std, 95% t-interval)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .._optional import require


def accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """Fraction of exact matches of class ids."""
    pred, target = np.asarray(pred), np.asarray(target)
    return float((pred == target).mean()) if target.size else float("nan")


def f1_scores(pred: np.ndarray, target: np.ndarray, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-class F1 and per-class support (number of true samples)."""
    pred, target = np.asarray(pred).astype(int), np.asarray(target).astype(int)
    k = num_classes or int(max(pred.max(initial=0), target.max(initial=0)) + 1)
    f1 = np.zeros(k)
    support = np.bincount(target, minlength=k)[:k].astype(float)
    for c in range(k):
        tp = np.sum((pred == c) & (target == c))
        fp = np.sum((pred == c) & (target != c))
        fn = np.sum((pred != c) & (target == c))
        denom = 2 * tp + fp + fn
        f1[c] = 2 * tp / denom if denom else 0.0
    return f1, support


def weighted_f1(pred, target, num_classes: int | None = None) -> float:
    """F1 averaged over classes weighted by support (scikit-learn's ``average='weighted'``)."""
    f1, support = f1_scores(pred, target, num_classes)
    return float((f1 * support).sum() / support.sum()) if support.sum() else float("nan")


def macro_f1(pred, target, num_classes: int | None = None) -> float:
    f1, _ = f1_scores(pred, target, num_classes)
    return float(f1.mean())


def mae(pred, target) -> float:
    return float(np.abs(np.asarray(pred, float).ravel() - np.asarray(target, float).ravel()).mean())


def pearson(pred, target) -> float:
    """Pearson correlation; nan when either side is constant."""
    p, t = np.asarray(pred, float).ravel(), np.asarray(target, float).ravel()
    if p.size < 2 or p.std() == 0 or t.std() == 0:
        return float("nan")
    return float(np.corrcoef(p, t)[0, 1])


def sentiment_metrics(pred, target) -> dict[str, float]:
    """CMU-MOSI / MOSEI metrics as reported by MulT-style papers.

    acc2_nonneg / f1_nonneg: positive = label >= 0 vs negative = label < 0, all samples.
    acc2_nonzero / f1_nonzero: samples with label != 0 only, positive = label > 0.
    acc7: both sides rounded and clipped to the integers -3..3. f1 is weighted binary F1.
    """
    p, t = np.asarray(pred, float).ravel(), np.asarray(target, float).ravel()
    out = {"mae": mae(p, t), "corr": pearson(p, t),
           "acc7": accuracy(np.clip(np.round(p), -3, 3), np.clip(np.round(t), -3, 3))}
    out["acc2_nonneg"] = accuracy(p >= 0, t >= 0)
    out["f1_nonneg"] = weighted_f1((p >= 0).astype(int), (t >= 0).astype(int), 2)
    nz = t != 0
    out["acc2_nonzero"] = accuracy(p[nz] > 0, t[nz] > 0) if nz.any() else float("nan")
    out["f1_nonzero"] = weighted_f1((p[nz] > 0).astype(int), (t[nz] > 0).astype(int), 2) if nz.any() else float("nan")
    return out


def dice(pred_mask: np.ndarray, target_mask: np.ndarray, empty: float = 1.0) -> float:
    """Dice of two boolean masks; ``empty`` when both are empty."""
    p, t = np.asarray(pred_mask, bool), np.asarray(target_mask, bool)
    total = p.sum() + t.sum()
    return float(2 * np.logical_and(p, t).sum() / total) if total else float(empty)


def brats_regions(labels: np.ndarray) -> dict[str, np.ndarray]:
    """BraTS label map (0 background, 1 necrotic core, 2 oedema, 3 enhancing; 4 is mapped to 3 on
    load) to the evaluated regions: whole tumour (1,2,3), tumour core (1,3), enhancing tumour (3)."""
    labels = np.asarray(labels)
    return {"wt": labels > 0, "tc": (labels == 1) | (labels == 3), "et": labels == 3}


def brats_dice(pred_labels: np.ndarray, target_labels: np.ndarray) -> dict[str, float]:
    """Dice of WT, TC and ET for one case (any shape, e.g. a whole volume), and their mean."""
    pr, tr = brats_regions(pred_labels), brats_regions(target_labels)
    out = {f"dice_{k}": dice(pr[k], tr[k]) for k in ("wt", "tc", "et")}
    out["dice_mean"] = float(np.mean(list(out.values())))
    return out


# -- over seeds ------------------------------------------------------------------------------------
def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample std and a 95% t-interval half-width of per-seed values."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "ci95": float("nan"), "n": 0}
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "ci95": t_crit(arr.size) * std / math.sqrt(arr.size),
            "n": int(arr.size)}


def t_crit(n: int) -> float:
    """Two-sided 95% Student-t critical value for n samples (n - 1 degrees of freedom), from
    ``scipy.stats`` (the ``cli`` extra)."""
    if n < 2:
        return float("nan")
    stats = require("scipy.stats", "cli", "Confidence intervals over seeds")
    return float(stats.t.ppf(0.975, n - 1))
