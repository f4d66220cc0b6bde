"""Exact resume after a crash (in-process and SIGKILL), atomic checkpoints, refused checkpoints,
and non-finite steps (stop with the last good checkpoint kept, or skip and count)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _state import assert_same_state

from cggm import cli
from cggm.data import load_dataset
from cggm.methods import Method, Support, build_method, list_methods
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
        update = method.wrap_optimizer_step  # what method.step calls around the optimizer step

        def crashing_update(take_step):
            if method.global_step == crash_at:
                raise Crash(f"crash at step {crash_at}")
            return update(take_step)

        method.wrap_optimizer_step = crashing_update
    options = dict(epochs=3, batch_size=16, checkpoint_every=7, progress=False, scheduler="cosine", seed=0)
    options.update(cfg)
    return Trainer(model, method, data, TrainConfig(**options), output_dir=out,
                   fingerprint={"arch": "mlp"})


def _final(result, method):
    # (after fit the method holds the selected epoch's state, as the model holds its weights: compare the
    # state at the end of training, which the engine returns)
    return {"model": result.extra["final_weights"], "method": result.extra["final_method"],
            "records": result.records, "loss": [h["train_loss"] for h in result.history],
            "val": [h["val/accuracy"] for h in result.history]}


def _assert_same(a, b):
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"model {k} differs after resume"
    assert_same_state(a["method"], b["method"], "method state after resume")
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
    assert result.extra["final_method"]["global_step"] == 30
    _assert_same(_final(result, resumed), ref)


# -- a real kill: SIGKILL a `cggm train` process mid-epoch, rerun the same command ---------------
CLI_SETTINGS = ["--preset", "synthetic", "--method", "cggm", "--quiet",
                "--set", "dataset.options={dim: 8, n_train: 320, n_val: 32, n_test: 32}",
                "--set", "model.options={feature_dim: 8, hidden: 16, head_hidden: 16, dropout: 0.1}",
                "--set", "train.epochs=3", "--set", "train.batch_size=16", "--set", "train.checkpoint_every=6",
                "--set", "train.deterministic=true", "--set", "train.scheduler=cosine"]


def _cli(out, delay):
    return [sys.executable, "-m", "cggm", "train", *CLI_SETTINGS, "--set", f"train.step_delay={delay}",
            "--output", str(out)]


def _kill_mid_epoch(out, delay) -> bool:
    """Start the run, SIGKILL it once last.pt is a mid-epoch checkpoint of epoch 2. False if the
    run ended before it could be killed (a very slow machine: the caller retries slower)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(_cli(out, delay), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last, seen, deadline = out / "last.pt", None, time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if last.exists() and last.stat().st_mtime_ns != seen:
                seen = last.stat().st_mtime_ns
                state = torch.load(last, map_location="cpu", weights_only=False)
                if state["epoch"] == 1 and state["batch"] > 0:
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.002)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        _, err = proc.communicate()
    if proc.returncode == 0:
        return False
    assert proc.returncode == -signal.SIGKILL, err.decode()
    return True


def test_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path):
    try:
        assert cli.main(["train", *CLI_SETTINGS, "--output", str(tmp_path / "ref")]) == 0
    finally:
        torch.use_deterministic_algorithms(False)
    for attempt, delay in enumerate((0.03, 0.1, 0.3)):
        out = tmp_path / f"killed{attempt}"
        if _kill_mid_epoch(out, delay):
            break
    else:
        pytest.fail("the run always finished before it could be killed")
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 1 and 0 < state["batch"] < 20 and not (out / "result.json").exists()

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    rerun = subprocess.run(_cli(out, 0), env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    ref, got = load_checkpoint(tmp_path / "ref" / "last.pt"), load_checkpoint(out / "last.pt")
    assert got["epoch"] == 3 and got["method"]["global_step"] == 60
    for k, v in ref["model"].items():
        assert torch.equal(v, got["model"][k]), f"model {k} differs from the uninterrupted run"
    for k, v in ref["method"]["auxiliary"]["modules"].items():
        assert torch.equal(v, got["method"]["auxiliary"]["modules"][k]), f"classifier {k} differs"
    for k in ("ema", "history"):
        assert torch.equal(ref["method"]["rule"][k], got["method"]["rule"][k]), f"rule {k} differs"
    for which in ("optimizer", ):
        for i, s in ref[which]["state"].items():
            for k, v in s.items():
                assert torch.equal(v, got[which]["state"][i][k]), f"{which} state {i}.{k} differs"
    assert ref["history"][-1]["val/accuracy"] == got["history"][-1]["val/accuracy"]


# -- atomic writes ---------------------------------------------------------------------------------
def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint_module.save_checkpoint({"epoch": 1, "w": torch.arange(4.0)}, path)
    before = path.read_bytes()

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(before[: len(before) // 2])  # partial bytes, then the "crash"
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", dies_halfway)
    with pytest.raises(CheckpointError, match="no space left on device.*the previous last.pt is intact"):
        checkpoint_module.save_checkpoint({"epoch": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind


def test_a_run_that_dies_while_checkpointing_resumes_exactly(tmp_path, monkeypatch):
    method = build_method("joint")
    ref = _final(_trainer(tmp_path / "ref", method).fit(), method)
    real_save, calls = torch.save, []

    def save_then_die(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the 4th checkpoint write: the mid-epoch one at step 17
            f.write(b"\x80\x02partial")
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path / "run", build_method("joint")).fit()
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1  # the epoch-end one, intact
    resumed = build_method("joint")
    _assert_same(_final(_trainer(tmp_path / "run", resumed).fit(), resumed), ref)


# -- refused checkpoints -----------------------------------------------------------------------------
@pytest.fixture()
def finished_run(tmp_path):
    out = tmp_path / "run"
    _trainer(out, build_method("joint"), epochs=1).fit()
    return out


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not-a-checkpoint"])
def test_a_corrupt_checkpoint_is_refused(finished_run, damage):
    last = finished_run / "last.pt"
    data = last.read_bytes()
    if damage == "truncated":
        last.write_bytes(data[: len(data) // 3])
    elif damage == "garbage":
        last.write_bytes(os.urandom(4096))
    elif damage == "empty":
        last.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(3)}, last)
    with pytest.raises(CheckpointError, match="corrupt|not a cggm-checkpoint") as err:
        _trainer(finished_run, build_method("joint"))
    assert str(last) in str(err.value)


@pytest.mark.parametrize("change", ["method", "modalities", "arch", "model-size", "lr", "epochs"])
def test_an_incompatible_checkpoint_is_refused(finished_run, change):
    data, method, fingerprint = _data(), build_method("joint"), {"arch": "mlp"}
    shape = dict(feature_dim=8, hidden=16, head_hidden=16)
    settings = dict(epochs=1, batch_size=16, checkpoint_every=7, progress=False, scheduler="cosine", seed=0)
    if change == "method":
        method = build_method("cggm")
    elif change == "modalities":
        data = load_dataset("synthetic", num_modalities=3, dim=8, n_train=160, n_val=32, n_test=32)
    elif change == "arch":
        fingerprint = {"arch": "other"}
    elif change == "model-size":
        shape["feature_dim"] = 12
    elif change == "lr":
        settings["lr"] = 0.01
    else:  # fewer epochs than the checkpoint has trained
        settings["epochs"], settings["scheduler"] = 1, "none"
        finished_run = finished_run.parent / "two-epochs"  # (a cosine run's epochs cannot grow on a resume)
        _trainer(finished_run, build_method("joint"), epochs=2).fit()
        settings["scheduler"] = "cosine"
    model = build_model("mlp", data.input_shapes, data.task, **shape)
    with pytest.raises(CheckpointError, match="incompatible with this run") as err:
        Trainer(model, method, data, TrainConfig(**settings), output_dir=finished_run, fingerprint=fingerprint)
    want = {"method": "method.name: 'joint' -> 'cggm'", "modalities": "modalities: ['strong', 'weak'] -> ['strong',",
            "arch": "model.arch: 'mlp' -> 'other'", "model-size": "the model differs",
            "lr": "its settings differ (train.lr: 0.001 -> 0.01)",
            "epochs": "train.epochs: 2 -> 1, but 2 epochs are already trained"}[change]
    assert want in str(err.value)
    assert "--no-resume" in str(err.value) and "new --output" in str(err.value)
    # resume=False starts over instead
    Trainer(model, method, data, TrainConfig(**settings), output_dir=finished_run, fingerprint=fingerprint,
            resume=False)


def test_a_resume_may_extend_epochs_and_change_how_it_reports(tmp_path):
    """Only the settings that do not change what is computed may differ on a resume (epochs may
    grow but for the cosine scheduler, whose shape they set: tests/test_schedules.py)."""
    finished_run = tmp_path / "run"
    _trainer(finished_run, build_method("joint"), epochs=1, scheduler="none").fit()
    data = _data()
    seed_everything(0)
    model = build_model("mlp", data.input_shapes, data.task, feature_dim=8, hidden=16, head_hidden=16, dropout=0.1)
    config = TrainConfig(epochs=2, batch_size=16, checkpoint_every=5, progress=True, log_interval=1.0, threads=1,
                         scheduler="none", seed=0, eval_batch_size=8, on_nonfinite="skip")
    result = Trainer(model, build_method("joint"), data, config, output_dir=finished_run,
                     fingerprint={"arch": "mlp"}).fit()
    assert [h["epoch"] for h in result.history] == [0, 1]


def test_the_cli_refuses_a_corrupt_checkpoint_with_exit_code_2(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *CLI_SETTINGS[:-4], "--set", "train.epochs=1", "--output", str(out)]
    assert cli.main(args) == 0
    (out / "last.pt").write_bytes((out / "last.pt").read_bytes()[:100])
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "cggm train: error:" in err and "last.pt is corrupt" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # nothing overwritten
    assert cli.main([*args, "--no-resume"]) == 0  # starting over is allowed


# -- non-finite steps ----------------------------------------------------------------------------------
class NonFiniteAt(Method):
    """Joint training whose loss (or one gradient) is made non-finite at the given steps."""

    name = "nonfinite-test"
    support = Support(edits_gradients=True)

    def __init__(self, steps, where="loss"):
        super().__init__()
        self.bad, self.where = set(steps), where
        self.attempt = -1  # steps attempted (global_step counts the steps taken)

    def compute_loss(self, out, target, task_loss):
        self.attempt += 1
        if self.where == "loss" and self.attempt in self.bad:
            return task_loss * float("nan")
        return task_loss

    def compute_gradients(self, loss):
        loss.backward()
        if self.where == "gradient" and self.attempt in self.bad:
            next(self.model.parameters()).grad[0, 0] = float("inf")


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, where):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as err:
        _trainer(out, NonFiniteAt([13], where), checkpoint_every=4).fit()
    msg = str(err.value)
    assert "step 13 (epoch 1, batch 3)" in msg and str(out / "last.pt") in msg
    assert ("loss=nan" in msg) == (where == "loss") and "gradient norm=" in msg
    state = load_checkpoint(out / "last.pt")
    assert (state["epoch"], state["batch"], state["method"]["global_step"]) == (1, 0, 10)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_skip_mode_skips_and_counts_non_finite_steps(tmp_path):
    clean = _trainer(None, NonFiniteAt([]), dropout=0.0, epochs=1, scheduler="none").fit()
    method = NonFiniteAt([3, 7], "loss")
    trainer = _trainer(None, method, dropout=0.0, epochs=1, scheduler="none", on_nonfinite="skip")
    seen = {}
    update = method.wrap_optimizer_step  # what method.step calls around the optimizer step
    method.wrap_optimizer_step = lambda take_step: (seen.setdefault(method.attempt, True), update(take_step))[1]
    result = trainer.fit()
    assert result.skipped_steps == 2 and method.attempt == 9 and result.extra["final_method"]["global_step"] == 8
    assert sorted(seen) == [0, 1, 2, 4, 5, 6, 8, 9]  # the optimizer never stepped on 3 and 7
    assert all(torch.isfinite(v).all() for v in result.extra["final_weights"].values())
    assert result.extra["final_weights"].keys() == clean.extra["final_weights"].keys()
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))


def test_cli_reports_divergence_and_skipped_steps(tmp_path, capsys):
    base = ["train", "--preset", "synthetic", "--method", "joint", "--quiet", "--set", "method.options={}",
            "--set", "dataset.options={dim: 8, n_train: 64, n_val: 16, n_test: 16}",
            "--set", "model.options={feature_dim: 8, hidden: 16, head_hidden: 16}",
            "--set", "train.epochs=1", "--set", "train.batch_size=16", "--set", "train.optimizer=sgd",
            "--set", "train.lr=1e30"]
    assert cli.main([*base, "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "cggm train: error: Training diverged at step 1 (epoch 0, batch 1)" in err
    assert cli.main([*base, "--set", "train.on_nonfinite=skip", "--output", str(tmp_path / "b")]) == 0
    assert "skipped non-finite steps: 3" in capsys.readouterr().out


@pytest.mark.parametrize("name", [m for m in list_methods() if m not in ("cggm", "joint")])
def test_every_method_resumes_exactly(tmp_path, name):
    """A crash mid-epoch (after the checkpoint at step 17), then a resume, ends like an
    uninterrupted run for every registered method: its own state (heads, optimizers, running
    statistics, stages, windows) is in its state_dict, and rebuilding lazily created modules does
    not shift the random stream."""
    ref_method = build_method(name)
    ref = _final(_trainer(tmp_path / "ref", ref_method).fit(), ref_method)
    with pytest.raises(Crash):
        _trainer(tmp_path / "run", build_method(name), crash_at=19).fit()
    torch.manual_seed(1234)  # the resumed run must not depend on the process's RNG state
    resumed = build_method(name)
    _assert_same(_final(_trainer(tmp_path / "run", resumed).fit(), resumed), ref)


# -- a finished run, run again -------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_methods())
def test_rerunning_a_finished_run_gives_the_same_result(tmp_path, name):
    """Nothing is left to train, so the method builds nothing on a first batch (CGGM's classifiers):
    the evaluation of the rerun must still have the method's own metrics, and the same values."""
    out = tmp_path / "run"
    first = _trainer(out, build_method(name), epochs=1, checkpoint_every=0).fit()
    before = (out / "result.json").read_text()
    torch.manual_seed(1234)
    again = _trainer(out, build_method(name), epochs=1, checkpoint_every=0).fit()
    assert again.test == first.test and again.val == first.val and again.history == first.history
    assert again.records == first.records
    if name.startswith("cggm"):
        assert {"clf/strong", "clf/weak"} <= set(again.test)
    strip = lambda text: {k: v for k, v in json.loads(text).items() if k != "seconds"}  # noqa: E731
    assert strip((out / "result.json").read_text()) == strip(before)
