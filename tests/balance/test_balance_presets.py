"""One smoke test per audio-visual preset: the preset as shipped (CGGM, ResNet-18, SGD), shrunk
through overrides only (ResNet width, frame size, spectrogram size), one epoch of two training
steps through the public engine on a fixture in the dataset's real layout, on CPU."""

import math
from pathlib import Path

import pytest

pytest.importorskip("PIL")
pytest.importorskip("yaml")

from balance_fixtures import write_ave, write_cremad, write_kinetics_sounds

from cggm.config import load_config
from cggm.runner import build_trainer

# 8 training clips at batch size 4: two training steps in one epoch
RUN = ["train.epochs=1", "train.batch_size=4", "train.eval_batch_size=8", "train.progress=false"]
TINY = ["model.options.width=4", "dataset.options.image_size=32"]


def fixture(preset: str, root: Path) -> list[str]:
    """Write a tiny copy of the preset's dataset at ``root``; return the overrides that shrink the run."""
    if preset == "cremad":
        write_cremad(root, classes=("ANG", "HAP"), per_class=(5, 2))
        return TINY + ["dataset.options.val_fraction=0.2",
                       "dataset.options.audio_options={num_samples: 4096, n_fft: 128, hop_length: 64}"]
    if preset == "kinetics_sounds":
        write_kinetics_sounds(root, classes=(3, 12), per_class=(5, 2), frames=4, spec_shape=(48, 32))
        return TINY + ["dataset.options.val_fraction=0.2", "dataset.options.frames=2"]
    write_ave(root, per_class=(3, 1, 1), frames=3, spec_shape=(40, 60))  # 9 listed, 1 dropped: 8 train clips
    return TINY + ["dataset.options.frames=2"]


@pytest.mark.parametrize("preset", ["cremad", "kinetics_sounds", "ave"])
def test_balance_preset_smoke(preset, tmp_path):
    overrides = fixture(preset, tmp_path / preset)
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
