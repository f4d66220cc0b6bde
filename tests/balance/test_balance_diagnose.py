"""`cggm diagnose` and `cggm bench --report` on an audio-visual run: the splits are memory-mapped
clip caches (no ``inputs``/``target`` tensors), read by batches without training augmentation."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("yaml")

from balance_fixtures import write_for_preset

from cggm.cli import main
from cggm.data import load_dataset
from cggm.data.balance._av import IMAGENET_MEAN, IMAGENET_STD
from cggm.data.stream import input_means, split_targets

RUN = ["train.epochs=1", "train.batch_size=4", "train.eval_batch_size=8"]


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def test_diagnose_and_bench_report_on_audio_visual_clips(tmp_path, capsys):
    overrides = write_for_preset("cremad", tmp_path / "data")
    common = ["--preset", "cremad", "--data-path", str(tmp_path / "data"), *_sets(overrides + RUN)]
    assert main(["train", *common, "--output", str(tmp_path / "run"), "--quiet"]) == 0
    assert main(["diagnose", str(tmp_path / "run"), "--json", str(tmp_path / "d.json")]) == 0
    d = json.loads((tmp_path / "d.json").read_text())
    assert set(d["drop"]) == set(d["probe"]) == set(d["raw_probe"]) == {"audio", "visual"}
    assert all(np.isfinite(v) for part in ("drop", "probe", "raw_probe") for v in d[part].values())
    assert "Memory-mapped data" in capsys.readouterr().out
    assert main(["bench", *common, "--methods", "joint", "--seeds", "1", "--report", str(tmp_path / "rep")]) == 0
    runs = json.loads((tmp_path / "rep" / "bench.json").read_text())["datasets"][0]["runs"]
    assert len(runs) == 1 and set(runs[0]["drop"]) == {"audio", "visual"}


def test_training_mean_of_clips_is_read_without_augmentation(tmp_path):
    overrides = write_for_preset("cremad", tmp_path)
    data = load_dataset("cremad", path=str(tmp_path), image_size=16, val_fraction=0.2,
                        audio_options={"num_samples": 4096, "n_fft": 128, "hop_length": 64})
    assert overrides and data.train.augment  # training batches are randomly cropped
    rows = data.train.index
    # reference: straight from the cache arrays, normalised as get_batch normalises
    pixels = np.asarray(data.train.visual[np.sort(rows)], dtype=np.float64) / 255.0
    mean, std = np.asarray(IMAGENET_MEAN).reshape(1, 1, 3, 1, 1), np.asarray(IMAGENET_STD).reshape(1, 1, 3, 1, 1)
    want_visual = ((pixels - mean) / std).mean(0, keepdims=True)
    want_audio = np.asarray(data.train.audio[np.sort(rows)], dtype=np.float64).mean(0, keepdims=True)
    rng = torch.get_rng_state()
    got = input_means(data.train)
    assert torch.equal(torch.get_rng_state(), rng)  # no random crop was drawn
    assert data.train.augment  # and augmentation is back on for training
    np.testing.assert_allclose(got["visual"].numpy(), want_visual, atol=1e-5)
    np.testing.assert_allclose(got["audio"].numpy(), want_audio, atol=1e-5)
    assert split_targets(data.train).tolist() == data.train.labels[rows].tolist()
