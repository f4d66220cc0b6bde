"""`cggm diagnose` and `cggm bench --report` on a Food-101 run: the splits are a memory-mapped
feature cache (no ``inputs``/``target`` tensors), read by batches."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("yaml")

from paper_fixtures import write_food_cache

from cggm.cli import main
from cggm.data import load_dataset
from cggm.data.stream import input_means, split_targets

TINY = ["model.options.d_model=8", "model.options.heads=2", "model.options.encoder_layers=1",
        "model.options.fusion_layers=1", "method.options.classifier_layers=1", "dataset.options.val_fraction=0.2",
        "train.epochs=1", "train.batch_size=4", "train.eval_batch_size=8"]


def test_diagnose_and_bench_report_on_food101_features(tmp_path):
    write_food_cache(tmp_path / "cache", n=(9, 4))
    common = ["--preset", "food101", "--data-path", str(tmp_path / "cache"), *[a for o in TINY for a in ("--set", o)]]
    assert main(["train", *common, "--output", str(tmp_path / "run"), "--quiet"]) == 0
    assert main(["diagnose", str(tmp_path / "run"), "--json", str(tmp_path / "d.json")]) == 0
    d = json.loads((tmp_path / "d.json").read_text())
    assert set(d["drop"]) == set(d["probe"]) == set(d["raw_probe"]) == {"image", "text"}
    assert all(np.isfinite(v) for part in ("drop", "probe", "raw_probe") for v in d[part].values())
    assert main(["bench", *common, "--methods", "joint", "--seeds", "1", "--report", str(tmp_path / "rep")]) == 0
    runs = json.loads((tmp_path / "rep" / "bench.json").read_text())["datasets"][0]["runs"]
    assert len(runs) == 1 and set(runs[0]["probe"]) == {"image", "text"}


def test_food101_means_targets_and_coarse_inputs(tmp_path):
    from cggm.commands import _coarse

    folder = write_food_cache(tmp_path, n=(12, 6))
    data = load_dataset("food101", path=str(folder), val_fraction=0.25)
    rows = np.sort(data.train.index)
    want = np.load(folder / "train_text.npy").astype(np.float64)[rows].mean(0, keepdims=True)
    np.testing.assert_allclose(input_means(data.train)["text"].numpy(), want, atol=1e-6)
    assert split_targets(data.train).tolist() == (data.train.index % 4).tolist()  # labels are row % 4
    # a sequence larger than the raw-probe limit is averaged over its unmasked tokens
    x, mask = torch.randn(2, 3, 2000), torch.tensor([[True, False, False], [True, True, True]])
    out = _coarse(x, mask)
    assert torch.allclose(out[0], x[0, 0]) and torch.allclose(out[1], x[1].mean(0), atol=1e-6)
    # frames [B, K, 3, H, W] become 8 x 8 cells per channel, averaged over the frames
    v = torch.rand(2, 3, 3, 40, 40)
    cells = _coarse(v, None)
    assert cells.shape == (2, 3 * 64)
    assert torch.allclose(cells[0, :64].reshape(8, 8)[0, 0], v[0, :, 0, :5, :5].mean(), atol=1e-6)
