"""CGGM's evaluation metric ``clf/<modality>`` (cggm.methods.cggm.parts.ClassifierMetric) against an
independent reference (issue 17): copies of the model and of the classifiers, put in eval mode, run
on the whole split at once, and the per-sample mean taken in numpy. The classifiers have dropout
0.5 (train mode would change their predictions) and the split (37 samples, batches of 8) ends in a
short batch (a mean of batch means would differ)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _ddp_cggm_worker as w  # noqa: E402


@pytest.mark.parametrize("kind", w.KINDS)
def test_clf_metric_is_the_eval_mode_per_sample_mean(kind):
    model, method, data, task = w.eval_setup(kind)
    whole, by_batch = w.clf_reference(model, method, data, task)
    for m in ("a", "b"):  # the short last batch matters on these inputs
        assert abs(whole[m] - by_batch[m]) > 1e-4, m
    got = w.evaluate_clf(kind)
    assert set(got) == {"clf/a", "clf/b"}
    for m in ("a", "b"):
        assert got[f"clf/{m}"] == pytest.approx(whole[m], rel=1e-6, abs=1e-7), m


def test_dropout_changes_the_classifiers_in_train_mode():
    """The inputs exercise eval mode: the same classifiers in train mode give another -MAE."""
    import copy

    import torch

    model, method, data, task = w.eval_setup("regression")
    whole, _ = w.clf_reference(model, method, data, task)
    clfs = copy.deepcopy(method.classifiers).train()
    with torch.no_grad():
        h = copy.deepcopy(model).eval()(data.inputs, {}).features[0]
        train_mode = -float((clfs[0](h) - data.target).abs().mean())
    assert abs(train_mode - whole["a"]) > 1e-3
