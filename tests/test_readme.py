"""Every example in README.md runs.

* ```python blocks are executed as they are.
* ```bash blocks: each command line is run with the installed package, in a temporary folder.
  Commands that need a dataset get a fixture in the dataset's real format at the path they name,
  plus a tiny model and a two-step budget (listed in PAPER_BUDGET). `make demo` is run as the
  command it wraps (`cggm demo`) with a smaller budget; `make test` is this test suite itself.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
sys.path.insert(0, str(ROOT / "tests" / "paper"))
sys.path.insert(0, str(ROOT / "tests" / "balance"))

TINY_SEQ = ["model.options.d_model=8", "model.options.heads=2", "model.options.encoder_layers=1",
            "model.options.fusion_layers=1", "method.options.classifier_layers=1"]
RUN = ["train.epochs=1", "train.batch_size=4", "train.eval_batch_size=8"]


def _blocks(lang: str, text: str = README) -> list[str]:
    return re.findall(rf"^ *```{lang}\n(.*?)```", text, flags=re.S | re.M)


def _command_blocks(text: str = README) -> list[list[str]]:
    """The command lines of each bash block (a block's commands may use each other's output)."""
    blocks = []
    for block in _blocks("bash", text):
        cmds = [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines()]
        blocks.append([c for c in cmds if c and not c.startswith("#")])
    return blocks


def _commands() -> list[str]:
    return [c for block in _command_blocks() for c in block]


def _make_fixture(preset: str, path: Path) -> list[str]:
    """Write a tiny dataset at ``path`` in the preset's format; return the budget overrides."""
    import paper_fixtures as fx

    path.mkdir(parents=True, exist_ok=True)
    if preset == "mosi":
        fx.write_mosi(path, sizes=(8, 4, 4))
        return TINY_SEQ + RUN
    if preset == "iemocap":
        pytest.importorskip("h5py")
        fx.write_iemocap(path, sizes=(8, 4, 4), long_audio=40)
        return TINY_SEQ + RUN + ["dataset.options.max_len={audio: 60}"]
    if preset == "food101":
        fx.write_food_cache(path, n=(9, 4))
        return TINY_SEQ + RUN + ["dataset.options.val_fraction=0.2"]
    if preset == "brats":
        pytest.importorskip("nibabel")
        fx.write_brats(path)
        return RUN + ["model.options.width=2", "dataset.options.crop=16", "dataset.options.fractions=[0.5, 0.25, 0.25]",
                      "dataset.options.slices_per_case=4", "dataset.options.workers=1"]
    if preset in ("cremad", "kinetics_sounds", "ave"):
        pytest.importorskip("PIL")
        import balance_fixtures as bfx

        return bfx.write_for_preset(preset, path) + RUN
    raise AssertionError(f"README names a preset with no fixture here: {preset}")


def test_readme_has_examples():
    assert len(_blocks("python")) >= 2
    assert any(c.startswith("cggm train") for c in _commands())
    assert "make demo" in _commands() and "make test" in _commands()


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_example(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _blocks("python")[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("block", range(len(_command_blocks())))
def test_shell_examples(block, tmp_path):
    """The commands of one bash block, in order, in one folder."""
    for command in _command_blocks()[block]:
        if command != "make test":  # this test suite
            _run(command, tmp_path)


def _run(command: str, tmp_path: Path) -> None:
    argv = shlex.split(command)
    extra: list[str] = []
    env = None
    if argv[:2] == ["make", "demo"]:
        argv = ["cggm", "demo", "--seeds", "1", "--epochs", "2", "--output", "demo_output"]
    if "--data-path" in argv:
        i = argv.index("--data-path")
        preset = argv[argv.index("--preset") + 1]
        fixture = tmp_path / "data" / preset
        argv[i + 1] = str(fixture)
        extra = [a for o in _make_fixture(preset, fixture) for a in ("--set", o)]
    if argv[:3] == ["python", "-m", "cggm.data.balance.prepare"]:
        # raw videos at the path it names, and a stand-in ffmpeg on PATH
        pytest.importorskip("PIL")
        import balance_fixtures as bfx

        i = argv.index("--root")
        argv[i + 1] = str(bfx.write_raw_videos(argv[3], tmp_path / "raw" / argv[3]))
        env = bfx.env_with_fake_ffmpeg(tmp_path / "bin")
    if argv[0] == "cggm":
        argv = [sys.executable, "-m", "cggm"] + argv[1:]
    elif argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run"] + argv[1:]
    elif env is not None:
        argv = [sys.executable] + argv[1:]
    else:
        raise AssertionError(f"the README test does not know how to run: {command}")
    proc = subprocess.run(argv + extra, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{command}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    if "demo" in argv:
        assert (tmp_path / "demo_output" / "demo.png").stat().st_size > 0
