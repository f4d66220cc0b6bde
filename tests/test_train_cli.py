"""`cggm train` as a PyTorch user expects it: the whole configuration checked before anything is
written, a resume that refuses changed settings, clear one-line errors (a full disk, Ctrl-C), and
the files and progress of a run (metrics.jsonl as it goes, history.json, records.json, plain
progress lines when stderr is not a terminal, TensorBoard behind its extra)."""

from __future__ import annotations

import errno

import pytest

from cggm import cli
from cggm.training import checkpoint as checkpoint_module
from cggm.training import load_checkpoint

TINY = ["--preset", "synthetic", "--quiet", "--set", "dataset.options={dim: 8, n_train: 64, n_val: 16, n_test: 16}",
        "--set", "model.options={feature_dim: 8, hidden: 16, head_hidden: 16}",
        "--set", "train.epochs=1", "--set", "train.batch_size=16"]


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
