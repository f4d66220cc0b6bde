"""`cggm train` as a PyTorch user expects it: the whole configuration checked before anything is
written, a resume that refuses changed settings, clear one-line errors (a full disk, Ctrl-C), and
the files and progress of a run (metrics.jsonl as it goes, history.json, records.json, plain
progress lines when stderr is not a terminal, TensorBoard behind its extra)."""

from __future__ import annotations

import errno
import json
import shlex
from pathlib import Path

import pytest

from cggm import cli
from cggm.config import ConfigError, check_config, load_config
from cggm.training import TrainConfig, TrainConfigError, Trainer, load_checkpoint
from cggm.training import checkpoint as checkpoint_module

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
           "method.options.rho=.inf": "method.options.rho must be a finite number, got inf"}
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
    assert cli.main(["train", *TINY, "--set", "train.epochs=2", "--set", "train.checkpoint_every=2",
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
