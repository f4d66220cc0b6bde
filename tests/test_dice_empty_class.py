"""The Dice of a class absent from both prediction and target (issue 17). The library's convention:
such a class scores **1** (nothing to find, nothing wrongly found), in every Dice it computes
(``cggm.metrics.hard_dice``, the segmentation tracker's ``dice_class<c>``, ``cggm.metrics.dice`` and
``brats_dice``'s regions). The references are written out from the definition
``2 |P & T| / (|P| + |T|)``, in plain Python over lists, with that convention, never by calling
the function under test."""

from __future__ import annotations

import pytest
import torch

import cggm.metrics
from cggm.metrics import brats_dice, dice, hard_dice
from cggm.types import Task

EMPTY = 1.0  # the library's convention for a class absent from both


def _dice_ref(pred: list[int], target: list[int], c: int) -> float:
    p = [x == c for x in pred]
    t = [x == c for x in target]
    inter = sum(a and b for a, b in zip(p, t))
    total = sum(p) + sum(t)
    return 2 * inter / total if total else EMPTY


# two 3x3 slices, 4 classes (0 background): class 3 absent from both slices; class 2 absent from
# both in slice 1 only; class 1 present in both
PRED = [[[0, 1, 1], [2, 2, 0], [0, 0, 1]],
        [[1, 1, 0], [0, 0, 0], [0, 1, 0]]]
TARGET = [[[0, 1, 0], [2, 0, 0], [0, 1, 1]],
          [[1, 0, 0], [0, 0, 0], [0, 1, 1]]]


def _flat(x):
    return [v for row in x for v in row]


def test_hard_dice_of_an_absent_class_is_one():
    for s in range(2):
        got = hard_dice(torch.tensor(PRED[s]), torch.tensor(TARGET[s]), 4).tolist()
        ref = [_dice_ref(_flat(PRED[s]), _flat(TARGET[s]), c) for c in (1, 2, 3)]
        assert ref[2] == EMPTY and (s == 0 or ref[1] == EMPTY)  # the inputs exercise the convention
        assert got == pytest.approx(ref, abs=1e-6)


def test_tracker_dice_averages_per_sample_dice_with_empty_classes_scoring_one():
    task = Task("segmentation", 4)
    tracker = task.metrics(sync=False)
    pred = torch.tensor(PRED)
    logits = torch.nn.functional.one_hot(pred, 4).permute(0, 3, 1, 2).float()  # argmax = PRED
    target = torch.tensor(TARGET)
    tracker.update(logits, target, torch.tensor(0.0))
    out = tracker.compute()
    per_sample = [[_dice_ref(_flat(PRED[s]), _flat(TARGET[s]), c) for c in (1, 2, 3)] for s in range(2)]
    ref = [sum(per_sample[s][k] for s in range(2)) / 2 for k in range(3)]
    assert ref[2] == 1.0 and ref[1] == pytest.approx((2 * 1 / 3 + 1) / 2)
    for c in (1, 2, 3):
        assert out[f"dice_class{c}"] == pytest.approx(ref[c - 1], abs=1e-6), c
    assert out["dice_mean"] == pytest.approx(sum(ref) / 3, abs=1e-6)


def test_numpy_dice_and_brats_regions_of_an_empty_class_are_one():
    import numpy as np

    assert cggm.metrics.dice is dice and callable(dice)  # (not shadowed by the submodule cggm.metrics.dice)
    assert dice(np.zeros((2, 3), bool), np.zeros((2, 3), bool)) == EMPTY
    # a case without enhancing tumour (no label 3) in prediction or target: ET scores 1
    pred, target = [0, 1, 2, 2, 0, 1], [0, 1, 1, 2, 0, 0]
    out = brats_dice(np.array(pred), np.array(target))
    regions = {"wt": lambda v: v > 0, "tc": lambda v: v in (1, 3), "et": lambda v: v == 3}
    for name, inside in regions.items():
        p, t = [inside(v) for v in pred], [inside(v) for v in target]
        total = sum(p) + sum(t)
        ref = 2 * sum(a and b for a, b in zip(p, t)) / total if total else EMPTY
        assert out[f"dice_{name}"] == pytest.approx(ref, abs=1e-12), name
    assert out["dice_et"] == EMPTY
