"""Dice on tensors: the soft Dice loss of segmentation and the hard Dice of labels (on the device)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


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
