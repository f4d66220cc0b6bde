"""Accumulate predictions over an evaluation pass and compute the task's metrics."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..types import Task, hard_dice
from . import functional as F


def selection_metric(task: Task) -> tuple[str, str]:
    """The validation metric used to select the checkpoint, and ``max`` or ``min``."""
    if task.kind == "classification":
        return "accuracy", "max"
    if task.kind == "regression":
        return "mae", "min"
    return "dice_mean", "max"


class MetricTracker:
    """Collects one evaluation pass. Classification and regression keep predictions on the host;
    segmentation keeps per-sample Dice sums (2D slices; volume-level Dice lives in the BraTS
    evaluator)."""

    def __init__(self, task: Task):
        self.task = task
        self.preds: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.dice_sum: Tensor | None = None
        self.loss_sum = 0.0
        self.count = 0

    def update(self, prediction: Tensor, target: Tensor, loss: Tensor | None = None) -> None:
        n = int(target.shape[0])
        self.count += n
        if loss is not None:
            self.loss_sum += float(loss) * n
        if self.task.kind == "segmentation":
            labels = prediction.argmax(dim=1)
            per = torch.stack([hard_dice(labels[i], target[i], self.task.num_outputs) for i in range(n)]).sum(0)
            self.dice_sum = per if self.dice_sum is None else self.dice_sum + per
            return
        if self.task.kind == "classification":
            self.preds.append(prediction.argmax(dim=1).cpu().numpy())
        else:
            self.preds.append(prediction.detach().float().reshape(n, -1)[:, 0].cpu().numpy())
        self.targets.append(target.detach().cpu().numpy().reshape(n, -1)[:, 0] if self.task.kind == "regression"
                            else target.cpu().numpy())

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {"loss": self.loss_sum / max(self.count, 1)}
        if self.task.kind == "segmentation":
            if self.dice_sum is not None:
                d = (self.dice_sum / self.count).cpu().numpy()
                for c, v in enumerate(d, start=1):
                    out[f"dice_class{c}"] = float(v)
                out["dice_mean"] = float(d.mean())
            return out
        if not self.preds:
            return out
        p, t = np.concatenate(self.preds), np.concatenate(self.targets)
        if self.task.kind == "classification":
            out["accuracy"] = F.accuracy(p, t)
            out["f1_weighted"] = F.weighted_f1(p, t, self.task.num_outputs)
            out["f1_macro"] = F.macro_f1(p, t, self.task.num_outputs)
        else:
            out.update(F.sentiment_metrics(p, t))
        return out
