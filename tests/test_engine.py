"""The engine: validation selects, test is evaluated once, records and metrics come back."""

import pytest
import torch

from cggm.data import load_dataset
from cggm.methods import build_method
from cggm.models import build_model
from cggm.training import TrainConfig, Trainer


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", n_train=256, n_val=128, n_test=128)


def test_validation_selects_and_test_runs_once(data, monkeypatch):
    model = build_model("mlp", data.input_shapes, data.task)
    trainer = Trainer(model, build_method("cggm"), data, TrainConfig(epochs=4, batch_size=32, progress=False))
    calls = []
    real = trainer.evaluate
    monkeypatch.setattr(trainer, "evaluate", lambda split: calls.append(split) or real(split))
    result = trainer.fit()
    assert calls == ["val"] * 4 + ["test"]
    vals = [h["val/accuracy"] for h in result.history]
    assert result.best_epoch == max(range(4), key=lambda e: (vals[e], -e))
    assert result.val["accuracy"] == vals[result.best_epoch]
    assert set(result.test) >= {"accuracy", "f1_weighted", "loss"}
    assert len(result.records["B/strong"]) == 4 * 8  # one record per step
    # each auxiliary classifier's metric on validation, every epoch
    assert all({"val/clf/strong", "val/clf/weak"} <= set(h) for h in result.history)


def test_test_metrics_come_from_the_best_checkpoint(data):
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shapes, data.task)
    # select the epoch with the *highest* validation loss: an early epoch, not the last one
    config = TrainConfig(epochs=3, batch_size=32, progress=False, select_metric="loss", select_mode="max")
    trainer = Trainer(model, build_method("joint"), data, config)
    result = trainer.fit()
    assert result.best_epoch < 2
    # the model now holds the selected weights, and test was evaluated on them
    assert trainer.evaluate("val")["loss"] == pytest.approx(result.val["loss"])
    assert trainer.evaluate("test") == pytest.approx(result.test)
    final = result.extra["final_weights"]
    assert any(not torch.equal(final[k], v) for k, v in model.state_dict().items())


def test_regression_task_metrics():
    from cggm.data.base import DataSplits, MultimodalDataset
    from cggm.types import Task

    g = torch.Generator().manual_seed(0)

    def split(n):
        a, b = torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)
        return MultimodalDataset({"a": a, "b": b}, (a[:, :1] + b[:, :1]).clamp(-3, 3))

    data = DataSplits("toy", Task("regression", 1), split(128), split(64), split(64))
    model = build_model("mlp", data.input_shapes, data.task)
    result = Trainer(model, build_method("cggm"), data, TrainConfig(epochs=2, batch_size=32, progress=False)).fit()
    assert {"mae", "corr", "acc7", "acc2_nonneg", "acc2_nonzero", "f1_nonzero"} <= set(result.test)
    assert "eps/a" in result.records  # -MAE of the classifiers, higher is better
    assert max(result.records["eps/a"]) <= 0


def test_gradient_edits_are_checked_and_clipped(data):
    """edit_gradients (in method.backward) runs before the engine's finite check and clipping."""
    from cggm.methods import Method
    from cggm.training import NonFiniteError

    class Blows(Method):
        def edit_gradients(self):
            for p in self.model.parameters():
                p.grad.mul_(1e6)
            if self.global_step == 2:
                next(self.model.parameters()).grad.fill_(float("nan"))

    model = build_model("mlp", data.input_shapes, data.task)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, Blows(), data, TrainConfig(epochs=1, batch_size=32, optimizer="sgd", lr=0.1, momentum=0.0,
                                                       clip_grad_norm=1.0, progress=False))
    with pytest.raises(NonFiniteError, match="step 2"):
        trainer.fit()
    # two clipped SGD steps of norm <= 1 at lr 0.1 despite the 1e6 factor
    moved = torch.sqrt(sum(((model.state_dict()[k] - before[k]).float() ** 2).sum() for k in before))
    assert float(moved) <= 2 * 0.1 + 1e-5
