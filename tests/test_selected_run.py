"""The selected epoch is tested as a whole (issue 17 item 1): its weights and the method's state of
that epoch (heads, classifiers, statistics). Reference: a fresh model and method loaded from the
run's best.pt and evaluated through the one evaluation path, independently of the engine's test."""

from __future__ import annotations

import pytest
import torch

from cggm.data import load_dataset
from cggm.methods import build_method
from cggm.models import build_model
from cggm.training import TrainConfig, Trainer
from cggm.training.checkpoint import load_checkpoint
from cggm.training.evaluation import evaluate


def _model(data, seed=0):
    torch.manual_seed(seed)
    return build_model("mlp", data.input_shapes, data.task, feature_dim=8, hidden=16, head_hidden=16)


@pytest.mark.parametrize("name", ["ume", "cggm"])
def test_the_selected_epoch_is_tested_with_its_method_state(name, tmp_path):
    data = load_dataset("synthetic", n_train=128, n_val=64, n_test=64)
    # select the epoch of the *lowest* validation accuracy, so it is not the last one
    config = TrainConfig(epochs=4, batch_size=32, lr=1e-2, progress=False, select_metric="accuracy", select_mode="min")
    result = Trainer(_model(data), build_method(name), data, config, output_dir=tmp_path).fit()
    assert result.best_epoch < 3, "the test needs a selected epoch before the last"
    best = load_checkpoint(tmp_path / "best.pt")
    model = _model(data, seed=1)
    model.load_state_dict(best["model"])
    method = build_method(name).bind(model, data.task, data.modalities)
    method.load_state_dict(best["method"])
    expected = evaluate(model, method, data.test, data.task, "cpu", config.eval_batch_size)
    assert result.test == pytest.approx(expected, rel=0, abs=0)
    if name == "ume":  # and the last epoch's heads give another number (what the engine tested before)
        last = build_method(name).bind(model, data.task, data.modalities)
        last.load_state_dict(result.extra["final_method"])
        other = evaluate(model, last, data.test, data.task, "cpu", config.eval_batch_size)
        assert other["accuracy"] != expected["accuracy"] or other["loss"] != expected["loss"]
    else:  # (CGGM's test loss is the model's; its classifiers are the selected epoch's, not the last)
        weight = "0.last.weight"
        assert not torch.equal(best["method"]["auxiliary"]["modules"][weight],
                               result.extra["final_method"]["auxiliary"]["modules"][weight])
