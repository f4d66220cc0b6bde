"""A run that starts over (--no-resume) moves the earlier run's files aside before it writes
anything, so a folder never mixes two runs, even when the new run fails; and `cggm diagnose`
refuses a folder whose config and checkpoint come from two runs."""

from __future__ import annotations

import pytest
import yaml

from cggm import cli
from cggm.commands import diagnose
from cggm.training import CheckpointError, Trainer

TINY = ["--set", "dataset.options={dim: 4, n_train: 32, n_val: 16, n_test: 16}",
        "--set", "model.options={feature_dim: 4, hidden: 8, head_hidden: 8}",
        "--set", "train.epochs=1", "--set", "train.batch_size=16", "--quiet"]
OLD_FILES = {"last.pt", "best.pt", "metrics.jsonl", "history.json", "records.json", "result.json", "config.yaml"}


def _method(folder):
    return yaml.safe_load((folder / "config.yaml").read_text())["method"]["name"]


def test_a_failed_no_resume_run_leaves_no_file_of_the_earlier_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--method", "joint", "--output", str(out)]) == 0
    old = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert OLD_FILES <= set(old)
    (out / "notes.txt").write_text("mine")  # not a run's file: stays

    def diverge(self):
        raise FloatingPointError("the new run diverged")

    monkeypatch.setattr(Trainer, "fit", diverge)
    capsys.readouterr()
    with pytest.raises(FloatingPointError):
        cli.main(["train", *TINY, "--method", "cggm", "--output", str(out), "--no-resume"])
    [aside] = [p for p in out.iterdir() if p.name.startswith("previous-")]
    err = capsys.readouterr().err
    assert f"starting over in {out}: moved the earlier run's files (best.pt, config.yaml, " in err
    assert str(aside) in err
    # the folder holds the new run only (its config; none of the old checkpoints or results) ...
    assert {p.name for p in out.iterdir() if p.is_file()} == {"config.yaml", "notes.txt"}
    assert _method(out) == "cggm"
    # ... and the earlier run is whole, aside
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == old
    assert _method(aside) == "joint"


def test_diagnose_refuses_a_folder_whose_config_and_checkpoint_disagree(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--method", "joint", "--output", str(out)]) == 0
    diagnose(out, shapley_masking=None)  # one run: fine
    # what a failed --no-resume run used to leave: the new method's config next to the old model
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["method"] = {"name": "cggm", "options": {}}
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.raises(CheckpointError, match="mixes two runs: its config.yaml and best.pt disagree "
                                              r"\(method.name: 'joint' -> 'cggm'"):
        diagnose(out, shapley_masking=None)
    assert cli.main(["diagnose", str(out)]) == 2
    assert "cggm diagnose: error:" in capsys.readouterr().err
