"""Learning-rate settings do what they say or are refused: min_lr floors the plateau scheduler,
warm-up works without cosine (or is refused), a width of 0 is refused, and a cosine run's epochs
cannot change on a resume (the schedule's shape would)."""

from __future__ import annotations

import pytest

from cggm.config import check_config, default_config
from cggm.data import load_dataset
from cggm.methods import build_method
from cggm.models.factory import build_model
from cggm.training import CheckpointError, TrainConfig, Trainer, seed_everything
from cggm.training.trainer import TrainConfigError


def _data():
    return load_dataset("synthetic", dim=8, n_train=64, n_val=16, n_test=16)


def _trainer(config, out=None):
    data = _data()
    seed_everything(0)
    model = build_model("mlp", data.input_shapes, data.task, feature_dim=4, hidden=8, head_hidden=8)
    return Trainer(model, build_method("joint"), data, config, output_dir=out)


def test_plateau_stops_at_min_lr():
    config = TrainConfig(scheduler="plateau", lr=1e-2, min_lr=5e-4, plateau_patience=0, plateau_factor=0.1,
                         progress=False)
    trainer = _trainer(config)
    scheduler = trainer._make_scheduler(steps_per_epoch=4)
    lrs = []
    for _ in range(6):  # no improvement after the first: the rate falls 10x each time, to min_lr and no further
        scheduler.step(1.0)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([1e-2, 1e-3, 5e-4, 5e-4, 5e-4, 5e-4])


def test_min_lr_above_lr_is_refused_for_plateau_and_ignored_min_lr_is_refused():
    with pytest.raises(TrainConfigError, match="min_lr must be <= lr with the plateau scheduler"):
        TrainConfig(scheduler="plateau", lr=1e-3, min_lr=1e-2)
    with pytest.raises(TrainConfigError, match="scheduler is 'none': set scheduler to plateau or cosine"):
        TrainConfig(scheduler="none", min_lr=1e-4)


def test_warmup_without_cosine_ramps_the_learning_rate():
    config = TrainConfig(scheduler="none", lr=1e-2, warmup_epochs=2, warmup_start_lr=0.0, epochs=3, batch_size=16,
                         progress=False)
    result = _trainer(config).fit()
    # 4 steps an epoch; the rate after epoch e's last step is lr * min((e + 1) * 4 / 8, 1)
    assert [h["lr"] for h in result.history] == pytest.approx([5e-3, 1e-2, 1e-2])


def test_warmup_settings_that_would_do_nothing_are_refused():
    with pytest.raises(TrainConfigError, match="not 'plateau': set warmup_epochs to 0 or use scheduler cosine") as e:
        TrainConfig(scheduler="plateau", warmup_epochs=2)
    assert [f for f, _ in e.value.problems] == ["warmup_epochs"]
    with pytest.raises(TrainConfigError, match="warmup_start_lr is not set: set it"):
        TrainConfig(scheduler="none", warmup_epochs=2)
    with pytest.raises(TrainConfigError, match="used only with warmup_epochs > 0"):
        TrainConfig(scheduler="cosine", warmup_start_lr=1e-4)
    TrainConfig(scheduler="cosine", warmup_epochs=2)  # cosine: a warm-up at lr, then the decay (as before)


@pytest.mark.parametrize("option", ["feature_dim", "hidden"])
def test_a_model_width_of_zero_is_refused(option):
    data = _data()
    widths = dict(feature_dim=4, hidden=8, head_hidden=8)
    widths[option] = 0
    with pytest.raises(ValueError, match=f"{option} must be an integer >= 1 .*sees no input"):
        build_model("mlp", data.input_shapes, data.task, **widths)
    cfg = default_config()
    cfg["model"] = {"arch": "mlp", "options": {option: 0}}
    assert any(p.startswith(f"model.options.{option} must be an integer >= 1") for p in check_config(cfg))


def test_a_cosine_resume_cannot_change_epochs_but_others_may_grow(tmp_path):
    settings = dict(epochs=1, batch_size=16, progress=False, seed=0)
    _trainer(TrainConfig(scheduler="cosine", **settings), tmp_path / "cosine").fit()
    grown = {**settings, "epochs": 2}
    with pytest.raises(CheckpointError, match="train.epochs: 1 -> 2, and the cosine scheduler") as err:
        _trainer(TrainConfig(scheduler="cosine", **grown), tmp_path / "cosine")
    assert "Resume with train.epochs=1" in str(err.value) and "--no-resume" in str(err.value)
    _trainer(TrainConfig(scheduler="cosine", **settings), tmp_path / "cosine").fit()  # same length: resumes
    for scheduler in ("none", "plateau"):
        _trainer(TrainConfig(scheduler=scheduler, **settings), tmp_path / scheduler).fit()
        result = _trainer(TrainConfig(scheduler=scheduler, **grown), tmp_path / scheduler).fit()
        assert [h["epoch"] for h in result.history] == [0, 1]
