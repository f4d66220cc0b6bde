"""One smoke test per audio-visual preset: the preset as shipped (CGGM, ResNet-18, SGD), shrunk
through overrides only (ResNet width, frame size, spectrogram size), one epoch of two training
steps through the public engine on a fixture in the dataset's real layout, on CPU."""

import math

import pytest

pytest.importorskip("PIL")
pytest.importorskip("yaml")

from balance_fixtures import write_for_preset

from cggm.config import load_config
from cggm.runner import build_trainer

# 8 training clips at batch size 4: two training steps in one epoch
RUN = ["train.epochs=1", "train.batch_size=4", "train.eval_batch_size=8", "train.progress=false"]


@pytest.mark.parametrize("preset", ["cremad", "kinetics_sounds", "ave"])
def test_balance_preset_smoke(preset, tmp_path):
    overrides = write_for_preset(preset, tmp_path / preset)
    cfg = load_config(preset=preset, overrides=[f"dataset.options.path={tmp_path / preset}", *overrides, *RUN])
    assert cfg["method"]["name"] == "cggm" and cfg["model"]["arch"] == "resnet18"
    assert (cfg["train"]["optimizer"], cfg["train"]["lr"], cfg["train"]["momentum"], cfg["train"]["weight_decay"]) == \
        ("sgd", 0.001, 0.9, 0.0001)
    trainer = build_trainer(cfg, output_dir=tmp_path / "run", progress=False)
    result = trainer.fit()
    assert len(result.history) == 1 and trainer.method.global_step == 2
    assert trainer.model.head_layer.in_features == 64  # two width-4 ResNet-18s, concatenated
    for split in (result.val, result.test):
        for key in ("accuracy", "f1_weighted", "loss"):
            assert math.isfinite(split[key]), (key, split)
        assert any(k.startswith("clf/") for k in split)  # CGGM's classifiers were trained and evaluated
    assert (tmp_path / "run" / "best.pt").is_file()
