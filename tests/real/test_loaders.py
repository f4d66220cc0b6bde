"""The built-in real datasets load offline with fixed, documented splits (skipped, with the reason,
when a source is not installed; `make install` installs them all)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cggm._optional import MissingDependencyError
from cggm.data import load_dataset
from cggm.data.base import DataError

# name -> (modalities and per-sample shapes, (train, val, test) sizes, classes)
EXPECTED = {
    "satellite": ({"visible": (18,), "near_ir": (18,)}, (3767, 668, 2000), 6),
    "satellite4": ({"green": (9,), "red": (9,), "nir1": (9,), "nir2": (9,)}, (3767, 668, 2000), 6),
    "mfeat": ({"pix": (240,), "fou": (76,)}, (1200, 400, 400), 10),
    "mfeat6": ({"fou": (76,), "fac": (216,), "kar": (64,), "pix": (240,), "zer": (47,), "mor": (6,)},
               (1200, 400, 400), 10),
    "cells": ({"ch1": (28,), "ch2": (2,), "ch3": (13,), "ch4": (13,)}, (806, 203, 1010), 2),
    "trump_tweets": ({"text": (256,), "meta": (15,)}, (6029, 1292, 1293), 2),
    "basic_motions": ({"accelerometer": (100, 3), "gyroscope": (100, 3)}, (28, 12, 40), 4),
    "cg_fashion_mnist": ({"gray": (1, 14, 14), "color": (3, 14, 14)}, (10000, 2000, 10000), 10),
}


def load_or_skip(name: str, **options):
    try:
        return load_dataset(name, **options)
    except (MissingDependencyError, DataError) as err:
        pytest.skip(f"{name} source not installed here ({err}); `make install` fetches it")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loader_shapes_splits_and_standardisation(name):
    shapes, sizes, classes = EXPECTED[name]
    data = load_or_skip(name)
    assert data.input_shapes == shapes
    assert (len(data.train), len(data.val), len(data.test)) == sizes
    assert data.task.num_outputs == classes
    for split in (data.train, data.val, data.test):
        assert int(split.target.min()) >= 0 and int(split.target.max()) < classes
        for x in split.inputs.values():
            assert x.dtype == torch.float32 and bool(torch.isfinite(x).all())
    # standardised with training statistics: the training split is centred, unit scale
    for m, x in data.train.inputs.items():
        axes = (0, 1) if x.ndim == 3 else (0,)
        mean = x.double().mean(dim=axes)
        assert float(mean.abs().max()) < 1e-4, m
        sd = x.double().std(dim=axes)
        assert bool(((sd - 1).abs() < 0.05).logical_or(sd < 1e-6).all()), m
    # every class appears in every split
    for split in (data.train, data.val, data.test):
        assert len(torch.unique(split.target)) == classes


def test_splits_are_fixed_and_seed_only_moves_validation():
    a, b = load_or_skip("satellite"), load_or_skip("satellite")
    assert torch.equal(a.train.inputs["visible"], b.train.inputs["visible"])
    c = load_or_skip("satellite", seed=1)
    assert not torch.equal(a.val.target, c.val.target) or not torch.equal(a.val.inputs["visible"],
                                                                         c.val.inputs["visible"])
    assert torch.equal(a.test.target, c.test.target)  # the official test split never moves
    counts = np.bincount(a.test.target.numpy(), minlength=6)
    assert counts.tolist() == [461, 224, 397, 211, 237, 470]  # UCI sat.tst class counts


def test_cg_fashion_mnist_color_is_a_training_shortcut_only():
    from cggm.diagnostics.probe import linear_probe

    data = load_or_skip("cg_fashion_mnist", n_train=1000, n_val=200, n_test=1000)

    def mean_rgb(split):  # the tint, averaged over pixels
        return split.inputs["color"].flatten(2).mean(2)

    fit = (mean_rgb(data.train), data.train.target)
    # the color alone predicts the label on validation (training distribution), not on test
    assert linear_probe(*fit, mean_rgb(data.val), data.val.target, data.task) > 0.8
    assert linear_probe(*fit, mean_rgb(data.test), data.test.target, data.task) < 0.2
