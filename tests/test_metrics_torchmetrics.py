"""The torchmetrics-backed MetricTracker gives the values of the functional reference
implementations (cggm.metrics.functional, numpy), and every metric declares its direction."""

import math

import numpy as np
import pytest
import torch

from cggm.metrics import functional as F
from cggm.metrics.tracker import MetricTracker
from cggm.types import Task, hard_dice


def _feed(tracker, pred, target, batch=7):
    for i in range(0, len(target), batch):
        tracker.update(pred[i:i + batch], target[i:i + batch], torch.tensor(0.5 + i))
    return tracker.compute()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_equals_the_functional_reference(seed):
    g = torch.Generator().manual_seed(seed)
    k = 5
    logits = torch.randn(53, k, generator=g)
    logits[:, 4] -= 100  # class 4 never predicted...
    target = torch.randint(0, 3, (53,), generator=g)  # ...nor a target (and class 3 never a target)
    out = _feed(MetricTracker(Task("classification", k)), logits, target)
    p, t = logits.argmax(1).numpy(), target.numpy()
    assert out["accuracy"] == pytest.approx(F.accuracy(p, t), abs=1e-12)
    assert out["f1_weighted"] == pytest.approx(F.weighted_f1(p, t, k), abs=1e-9)
    # absent classes count 0 (torchmetrics' own macro F1 would leave them out)
    assert out["f1_macro"] == pytest.approx(F.macro_f1(p, t, k), abs=1e-9)


def test_loss_is_the_sample_weighted_mean_of_batch_losses():
    t = MetricTracker(Task("classification", 2))
    t.update(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), torch.tensor(1.0))
    t.update(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), torch.tensor(5.0))
    assert t.compute()["loss"] == pytest.approx((3 * 1.0 + 5.0) / 4)


@pytest.mark.parametrize("seed", [0, 1])
def test_regression_equals_the_mosi_reference(seed):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(-3, 4, (61, 1), generator=g).float() * 0.9  # zeros included
    target[::5] = 0.0
    pred = torch.randn(61, 1, generator=g) * 2
    pred[3] = 0.5  # a .5 tie of the rounding: both sides round half to even
    out = _feed(MetricTracker(Task("regression", 1)), pred, target)
    ref = F.sentiment_metrics(pred.numpy().ravel(), target.numpy().ravel())
    assert set(ref) <= set(out)
    for name, value in ref.items():
        assert out[name] == pytest.approx(value, abs=1e-9), name


def test_regression_edge_cases_are_nan_as_in_the_reference():
    out = _feed(MetricTracker(Task("regression", 1)), torch.ones(6, 1), torch.zeros(6, 1))
    assert math.isnan(out["corr"]) and math.isnan(out["acc2_nonzero"]) and math.isnan(out["f1_nonzero"])
    assert out["mae"] == pytest.approx(1.0)
    assert out["acc2_nonneg"] == pytest.approx(1.0)  # both sides >= 0


def test_segmentation_dice_is_the_per_sample_mean_of_hard_dice():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 3, 6, 6, generator=g)
    target = torch.randint(0, 3, (9, 6, 6), generator=g)
    target[2] = 0  # a slice without foreground: an empty class scores 1 where both are empty
    labels = logits.argmax(1)
    ref = np.mean([hard_dice(labels[i], target[i], 3).numpy() for i in range(9)], axis=0)
    # the hand-computed Dice of one class of one slice, as a check of the reference itself
    p, tt = (labels[0] == 1).numpy(), (target[0] == 1).numpy()
    assert hard_dice(labels[0], target[0], 3)[0].item() == pytest.approx(2 * (p & tt).sum() / (p.sum() + tt.sum()))
    out = _feed(MetricTracker(Task("segmentation", 3)), logits, target, batch=4)
    assert out["dice_class1"] == pytest.approx(ref[0], abs=1e-6)
    assert out["dice_class2"] == pytest.approx(ref[1], abs=1e-6)
    assert out["dice_mean"] == pytest.approx(ref.mean(), abs=1e-6)


def test_every_metric_declares_its_direction():
    lower = {"loss", "mae"}
    for task in (Task("classification", 3), Task("regression", 1), Task("segmentation", 3)):
        tracker = MetricTracker(task)
        directions = tracker.higher_is_better
        g = torch.Generator().manual_seed(0)
        if task.kind == "segmentation":
            pred, target = torch.randn(4, 3, 4, 4, generator=g), torch.randint(0, 3, (4, 4, 4), generator=g)
        elif task.kind == "regression":
            pred, target = torch.randn(4, 1, generator=g), torch.randn(4, 1, generator=g)
        else:
            pred, target = torch.randn(4, 3, generator=g), torch.randint(0, 3, (4,), generator=g)
        names = set(_feed(tracker, pred, target))
        assert names == set(directions), task.kind
        assert {n for n, up in directions.items() if not up} == lower & names


@pytest.mark.parametrize("kind,outputs", [("classification", 4), ("regression", 1), ("segmentation", 3)])
def test_a_reset_tracker_equals_a_fresh_one(kind, outputs):
    """The engine reuses one tracker per task and device (building one costs milliseconds)."""


    task = Task(kind, outputs)
    g = torch.Generator().manual_seed(0)

    def batch():
        if kind == "classification":
            return torch.randn(16, 4, generator=g), torch.randint(0, 4, (16,), generator=g)
        if kind == "regression":
            return torch.randn(16, 1, generator=g), torch.randn(16, generator=g)
        return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4, 8, 8), generator=g)

    reused = MetricTracker(task)
    for _ in range(2):
        reused.update(*batch(), loss=torch.tensor(3.0))
    reused.compute()
    reused.reset()
    fresh = MetricTracker(task)
    for _ in range(2):
        p, t = batch()
        reused.update(p, t, loss=torch.tensor(0.5))
        fresh.update(p, t, loss=torch.tensor(0.5))
    a, b = reused.compute(), fresh.compute()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], nan_ok=True), k
