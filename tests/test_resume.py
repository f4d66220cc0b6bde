"""Exact resume after a crash (in-process and SIGKILL), atomic checkpoints, refused checkpoints,
and non-finite steps (stop with the last good checkpoint kept, or skip and count)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cggm import cli
from cggm.data import load_dataset
from cggm.methods import Method, build_method
from cggm.models.factory import build_model
from cggm.training import CheckpointError, NonFiniteError, TrainConfig, Trainer, load_checkpoint, seed_everything
from cggm.training import checkpoint as checkpoint_module

ROOT = Path(__file__).resolve().parents[1]


class Crash(Exception):
    pass


def _data():
    return load_dataset("synthetic", dim=8, n_train=160, n_val=32, n_test=32)


def _trainer(out, method, crash_at=None, dropout=0.1, **cfg):
    data = _data()
    seed_everything(0)
    model = build_model("mlp", data.input_shapes, data.task, feature_dim=8, hidden=16, head_hidden=16,
                        dropout=dropout)
    if crash_at is not None:  # dies just before optimizer step `crash_at`
        step = method.step

        def crashing_step(optimizer):
            if method.global_step == crash_at:
                raise Crash(f"crash at step {crash_at}")
            step(optimizer)

        method.step = crashing_step
    options = dict(epochs=3, batch_size=16, checkpoint_every=7, progress=False, scheduler="cosine", seed=0)
    options.update(cfg)
    return Trainer(model, method, data, TrainConfig(**options), output_dir=out,
                   fingerprint={"arch": "mlp"})


def _final(result, method):
    return {"model": result.extra["final_weights"],
            "method": {f"{n}.{k}": v for n, m in method.modules().items() for k, v in m.state_dict().items()},
            "records": result.records, "loss": [h["train_loss"] for h in result.history],
            "val": [h["val/accuracy"] for h in result.history]}


def _assert_same(a, b):
    for part in ("model", "method"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part} {k} differs after resume"
    assert a["records"] == b["records"]
    assert a["loss"] == b["loss"] and a["val"] == b["val"]


METHODS = {
    "cggm": lambda: build_method("cggm"),
    "cggm-official": lambda: build_method("cggm", direction="weight", rule="paper", scale_on="gradient"),
    "cggm-sgd-classifiers": lambda: build_method("cggm", classifier_optimizer="sgd", rule_options={"window": 3}),
    "joint": lambda: build_method("joint"),
}


@pytest.mark.parametrize("crash_at", [19, 24])  # mid-epoch (after the checkpoint at step 17), after an epoch end
@pytest.mark.parametrize("name", list(METHODS))
def test_resume_after_a_crash_is_exact(tmp_path, name, crash_at):
    method = METHODS[name]()
    ref = _final(_trainer(tmp_path / "ref", method).fit(), method)

    crashed = METHODS[name]()
    with pytest.raises(Crash):
        _trainer(tmp_path / "run", crashed, crash_at=crash_at).fit()
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert (state["epoch"], state["batch"]) == ((1, 7) if crash_at == 19 else (2, 0))
    torch.manual_seed(1234)  # the process that resumes starts from another RNG state
    resumed = METHODS[name]()
    result = _trainer(tmp_path / "run", resumed).fit()
    assert resumed.global_step == 30
    _assert_same(_final(result, resumed), ref)
