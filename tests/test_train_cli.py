"""`cggm train` as a PyTorch user expects it: the whole configuration checked before anything is
written, a resume that refuses changed settings, clear one-line errors (a full disk, Ctrl-C), and
the files and progress of a run (metrics.jsonl as it goes, history.json, records.json, plain
progress lines when stderr is not a terminal, TensorBoard behind its extra)."""

from __future__ import annotations

import errno
import io
import json
import shlex
import sys
from pathlib import Path

import pytest
import torch

from cggm import cli
from cggm.config import ConfigError, check_config, load_config
from cggm.data import load_dataset
from cggm.methods import build_method
from cggm.models import build_model
from cggm.training import TrainConfig, TrainConfigError, Trainer, load_checkpoint
from cggm.training import checkpoint as checkpoint_module
from cggm.training import progress as progress_module

TINY = ["--preset", "synthetic", "--quiet", "--set", "dataset.options={dim: 8, n_train: 64, n_val: 16, n_test: 16}",
        "--set", "model.options={feature_dim: 8, hidden: 16, head_hidden: 16}",
        "--set", "train.epochs=1", "--set", "train.batch_size=16"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# -- 1. the whole configuration, checked first ------------------------------------------------------
def test_every_config_problem_is_reported_at_once_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    bad = {"train.select_mode=up": "train.select_mode must be max, min or null, got 'up'",
           "train.min_lr=-5": "train.min_lr must be >= 0, got -5",
           "seed=abc": "seed must be an integer, got 'abc'",
           "dataset.options.n_train=abc": "dataset.options.n_train must be an integer, got 'abc'",
           "method.options.classifier_lr=-1": "method.options.classifier_lr: classifier_lr must be > 0, got -1",
           "train.plateau_factor=2": "train.plateau_factor must be in (0, 1)",
           "method.options.rho=.inf": "method.options.rho must be a finite number or null, got inf"}
    argv = ["train", *TINY, *[a for item in bad for a in ("--set", item)], "--output", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[0] == f"cggm train: error: {len(bad)} problems in the configuration:", err
    assert len(lines) == 1 + len(bad) and "Traceback" not in err
    for msg in bad.values():
        assert sum(msg in line for line in lines[1:]) == 1, (msg, err)
    assert not out.exists()


def test_a_selection_metric_the_run_does_not_produce_is_refused_before_training(tmp_path, capsys, monkeypatch):
    def no_step(*args, **kwargs):
        raise AssertionError("a training step ran before the configuration was refused")

    out = tmp_path / "run"
    monkeypatch.setattr(Trainer, "_train_step", no_step)
    assert cli.main(["train", *TINY, "--set", "train.select_metric=acuracy", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == ("cggm train: error: train.select_metric 'acuracy' is not a metric of this run; it has accuracy, "
                   "clf/strong, clf/weak, f1_macro, f1_weighted, loss\n")
    # the classifiers' metrics are CGGM's: joint training has none
    argv = ["train", *TINY, "--method", "joint", "--set", "train.select_metric=clf/weak", "--output", str(out)]
    assert cli.main(argv) == 2
    assert "train.select_metric 'clf/weak' is not a metric of this run; it has accuracy, f1_macro" in \
        capsys.readouterr().err
    assert not out.exists()
    monkeypatch.undo()
    assert cli.main(["train", *TINY, "--set", "train.select_metric=clf/weak", "--output", str(out)]) == 0


def test_a_directory_as_config_and_a_device_that_cannot_train_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["train", *TINY, "--config", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"cggm train: error: Config file {tmp_path} is a directory, not a YAML "
                                       f"file.\n")
    (tmp_path / "config.yaml").write_text("train: {epochs: 1}\n")
    assert cli.main(["train", *TINY, "--config", str(tmp_path)]) == 2
    assert f"(did you mean {tmp_path / 'config.yaml'}?)" in capsys.readouterr().err
    assert cli.main(["train", *TINY, "--device", "meta"]) == 2
    err = capsys.readouterr().err
    assert err == ("cggm train: error: --device 'meta' cannot train a model (meta tensors hold no values); cggm "
                   "trains on cpu, cuda, mps or xpu.\n")


def test_the_schema_checks_options_against_the_loader_signature():
    cfg = load_config(preset="synthetic", overrides=["dataset.options.imbalance=2e0"])  # YAML reads 2e0 as text
    assert cfg["dataset"]["options"]["imbalance"] == 2.0
    bad = load_config(preset="synthetic") | {"dataset": {"name": "synthetic", "options": {"dim": 1.5, "bogus": 1}}}
    assert check_config(bad) == [
        "dataset.options.dim must be an integer, got 1.5",
        "dataset.options.bogus: not an option of synthetic (options: dim, imbalance, n_test, n_train, n_val, "
        "num_classes, num_modalities, seed, signal, strong_corruption)"]
    with pytest.raises(ConfigError, match=r"dataset.options.path: required by dataset 'mosi' \(give it with "):
        load_config(overrides=["dataset.name=mosi"])
    # the library's TrainConfig reports every problem too
    with pytest.raises(TrainConfigError) as err:
        TrainConfig(lr=-1, momentum=1.5, scheduler="cosine", epochs="x")
    assert [name for name, _ in err.value.problems] == ["epochs", "lr", "momentum"]


# -- 2. a resume with other settings is refused ------------------------------------------------------
def test_resume_refuses_changed_settings_and_allows_more_epochs(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--output", str(out)]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    argv = ["train", *TINY, "--set", "train.lr=0.01", "--set", "dataset.options.n_train=32", "--output", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.lr: 0.001 -> 0.01" in err and "dataset.options.n_train: 64 -> 32" in err
    assert "--no-resume" in err and "new --output" in err
    assert _snapshot(out) == before  # config.yaml still says what the checkpoint was trained with
    # more epochs and other progress settings continue the run
    assert cli.main(["train", *TINY, "--set", "train.epochs=2", "--set", "train.log_interval=5",
                     "--output", str(out)]) == 0
    assert [row["epoch"] for row in json.loads((out / "result.json").read_text())["history"]] == [0, 1]
    assert load_config(out / "config.yaml")["train"]["epochs"] == 2
    # and --no-resume starts over with the new settings
    assert cli.main([*argv, "--no-resume"]) == 0
    assert load_config(out / "config.yaml")["train"]["lr"] == 0.01


# -- 3. rerun, full disk, Ctrl-C ------------------------------------------------------------------------
def test_rerunning_a_finished_run_keeps_the_classifier_metrics_in_result_json(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--output", str(out)]) == 0
    first = json.loads((out / "result.json").read_text())
    assert cli.main(["train", *TINY, "--output", str(out)]) == 0
    again = json.loads((out / "result.json").read_text())
    assert {"clf/strong", "clf/weak"} <= set(first["test"])
    assert again["test"] == first["test"] and again["val"] == first["val"]


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1536 vs 1462\n"
                 "PytorchStreamWriter failed writing file data/4: file write failed (No space left on device)"),
    OSError(errno.ENOSPC, "No space left on device")])
def test_a_full_disk_while_checkpointing_is_one_line_and_the_last_checkpoint_stays(tmp_path, capsys, monkeypatch,
                                                                                  error):
    out = tmp_path / "run"
    real_save = checkpoint_module.torch.save

    def save(obj, f, *args, **kwargs):
        if "optimizer" in obj and obj["epoch"] == 2:  # last.pt at the end of epoch 2 (best.pt has no optimizer)
            f.write(b"partial")
            raise error
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    argv = ["train", *TINY, "--set", "train.epochs=2", "--output", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"cggm train: error: Could not write the checkpoint {out / 'last.pt'} (no space left on device); "
                   f"the previous last.pt is intact. Free some disk space, then rerun the same command to resume "
                   f"from it.\n")
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert cli.main(argv) == 0
    assert load_checkpoint(out / "last.pt")["epoch"] == 2


def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run dir"  # a path that needs quoting in the printed command
    argv = ["train", *TINY, "--set", "train.epochs=2", "--output", str(out), "--no-resume"]
    real_step = Trainer._train_step

    def step(self, *args, epoch, batch_index, **kwargs):
        if epoch == 1 and batch_index == 2:
            raise KeyboardInterrupt
        return real_step(self, *args, epoch=epoch, batch_index=batch_index, **kwargs)

    monkeypatch.setattr(Trainer, "_train_step", step)
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[0] == (f"cggm train: interrupted. The last checkpoint, {out / 'last.pt'}, is kept; "
                                   f"the same command resumes from it:")
    command = err.splitlines()[1].strip()
    assert command == shlex.join(["cggm", *argv[:-1]])  # without --no-resume, which would start over
    monkeypatch.undo()
    assert cli.main(shlex.split(command)[1:]) == 0
    assert [row["epoch"] for row in json.loads((out / "result.json").read_text())["history"]] == [0, 1]


def test_ctrl_c_while_setting_up_is_no_traceback_either(tmp_path, capsys, monkeypatch):
    import cggm.runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. while the data loads

    monkeypatch.setattr(cggm.runner, "build_trainer", interrupted)
    argv = ["train", *TINY, "--output", str(tmp_path / "run")]
    assert cli.main(argv) == 130
    assert capsys.readouterr().err == ("cggm train: interrupted before the first checkpoint; this command starts the "
                                       f"run again:\n  {shlex.join(['cggm', *argv])}\n")


# -- 4. the files of a run, progress, threads, TensorBoard ---------------------------------------------
def test_a_run_writes_metrics_as_it_goes_and_the_files_the_readme_promises(tmp_path, monkeypatch):
    out = tmp_path / "run"
    lines_at_validation = []
    real_evaluate = Trainer.evaluate

    def evaluate(self, split):
        if split == "val":
            path = out / "metrics.jsonl"
            lines_at_validation.append(len(path.read_text().splitlines()) if path.exists() else None)
        return real_evaluate(self, split)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    assert cli.main(["train", *TINY, "--set", "train.epochs=3", "--output", str(out)]) == 0
    assert lines_at_validation == [0, 1, 2]  # epoch e's line is there before epoch e + 1 ends
    assert {"config.yaml", "last.pt", "best.pt", "metrics.jsonl", "history.json", "records.json",
            "result.json"} <= {p.name for p in out.iterdir()}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    history = json.loads((out / "history.json").read_text())
    assert rows == history == json.loads((out / "result.json").read_text())["history"]
    assert [r["epoch"] for r in rows] == [0, 1, 2] and {"train_loss", "lr", "val/accuracy", "val/clf/weak"} <= set(rows[0])
    records = json.loads((out / "records.json").read_text())
    assert len(records["B/strong"]) == len(records["B/weak"]) == 3 * 4  # 64 samples / 16 per batch, 3 epochs


def test_progress_is_plain_periodic_lines_when_stderr_is_not_a_terminal(capsys):
    data = load_dataset("synthetic", dim=8, n_train=64, n_val=16, n_test=16)
    model = build_model("mlp", data.input_shapes, data.task, feature_dim=8, hidden=16, head_hidden=16)
    config = TrainConfig(epochs=2, batch_size=16, log_interval=0)
    Trainer(model, build_method("joint"), data, config).fit()
    err = capsys.readouterr().err
    steps = [line for line in err.splitlines() if " step " in line]
    assert [s.split(" loss ")[0] for s in steps] == [f"epoch {e}/2 step {i}/4" for e in (1, 2) for i in (1, 2, 3)]
    assert "\r" not in err and len([line for line in err.splitlines() if "train_loss" in line]) == 2
    # at the default interval (30 s) a short epoch prints its summary line only
    Trainer(model, build_method("joint"), data, TrainConfig(epochs=1, batch_size=16)).fit()
    assert [line.split(" | ")[0] for line in capsys.readouterr().err.splitlines()] == ["epoch 1/1"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("with_tqdm", [True, False])
def test_progress_on_a_terminal_is_a_bar_with_or_without_tqdm(monkeypatch, with_tqdm):
    if with_tqdm:
        pytest.importorskip("tqdm")
    else:
        monkeypatch.setattr(progress_module, "_tqdm", lambda: None)
    stream = _Terminal()
    bar = progress_module.Progress(epochs=3, stream=stream)
    bar.start_epoch(0, total=4)
    for i in range(1, 5):
        bar.step(i, torch.tensor(0.5))
    bar.end_epoch()
    text = stream.getvalue()
    assert "epoch 1/3" in text and "\r" in text
    if with_tqdm:
        assert "0/4 [00:00<?, ?step/s]" in text  # tqdm's bar (redrawn at most every 0.1 s, cleared at the end)
    else:
        assert text.endswith("\repoch 1/3 [########################] 4/4 loss 0.5000\n")


def test_threads_are_set_during_fit_and_given_back(monkeypatch):
    data = load_dataset("synthetic", dim=8, n_train=64, n_val=16, n_test=16)
    model = build_model("mlp", data.input_shapes, data.task, feature_dim=8, hidden=16, head_hidden=16)
    seen = []
    real_step = Trainer._train_step
    monkeypatch.setattr(Trainer, "_train_step",
                        lambda self, *a, **k: (seen.append(torch.get_num_threads()), real_step(self, *a, **k))[1])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        Trainer(model, build_method("joint"), data, TrainConfig(epochs=1, batch_size=16, threads=1,
                                                                 progress=False)).fit()
        assert set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        Trainer(model, build_method("joint"), data, TrainConfig(epochs=1, batch_size=16, progress=False)).fit()
        assert set(seen) == {2}  # threads: null leaves torch's setting alone
    finally:
        torch.set_num_threads(before)


def test_tensorboard_without_the_package_is_a_one_line_error_before_anything_is_written(tmp_path, capsys,
                                                                                        monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now raises ImportError
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--set", "train.tensorboard=true", "--output", str(out)]) == 2
    assert capsys.readouterr().err == (
        "cggm train: error: TensorBoard logging (train.tensorboard) needs the optional package 'tensorboard', which "
        "is not installed. Install it with: pip install 'cggm[tensorboard]'\n")
    assert not out.exists()


def test_tensorboard_writes_epoch_scalars_and_step_records(tmp_path):
    pytest.importorskip("tensorboard", reason="the `tensorboard` extra is not installed (pip install 'cggm[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--set", "train.epochs=2", "--set", "train.tensorboard=true",
                     "--output", str(out)]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"val/accuracy", "train/train_loss", "B/strong"} <= tags
    assert [e.step for e in events.Scalars("val/accuracy")] == [1, 2]
    assert len(events.Scalars("B/strong")) == 2 * 4


def test_checking_select_metric_does_not_change_the_run():
    """The selection metric is checked before training on a throw-away copy of the method: a
    method that builds modules at evaluation (ume's heads) must train exactly as without the check."""
    import torch

    from cggm.data import load_dataset
    from cggm.methods import build_method
    from cggm.models import build_model
    from cggm.training import TrainConfig, Trainer

    data = load_dataset("synthetic", dim=8, n_train=64, n_val=16, n_test=16)
    weights = []
    for select in (None, "accuracy"):
        torch.manual_seed(3)
        model = build_model("mlp", data.input_shapes, data.task, feature_dim=8, hidden=16, head_hidden=16)
        Trainer(model, build_method("ume"), data, TrainConfig(epochs=1, batch_size=16, progress=False,
                                                               select_metric=select)).fit()
        weights.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*weights):
        assert torch.equal(a, b)
