"""What a user installing from the package index gets: the licence and the typing marker in the
wheel and sdist, and a README whose links work where PyPI renders it (without the repository)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_wheel_and_sdist_ship_license_and_py_typed(tmp_path):
    """Builds with the PEP 517 hooks of the installed setuptools (no network, no build isolation),
    in a copy of the tree so the repository gets no build/ folder."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src_tree"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path / "dist"
    out.mkdir()
    for hook in ("build_wheel", "build_sdist"):  # one process each: setuptools keeps state between them
        proc = subprocess.run([sys.executable, "-c", f"import sys; from setuptools import build_meta as b; "
                               f"b.{hook}(sys.argv[1])", str(out)], cwd=src, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
    wheel, sdist = next(out.glob("*.whl")), next(out.glob("*.tar.gz"))

    names = zipfile.ZipFile(wheel).namelist()
    assert "cggm/py.typed" in names
    licenses = [n for n in names if n.startswith("cggm-") and n.endswith("/LICENSE")]
    assert licenses, f"no LICENSE in {wheel.name}: {[n for n in names if 'dist-info' in n]}"
    text = zipfile.ZipFile(wheel).read(licenses[0]).decode()
    assert "MIT License" in text and "Copyright (c) 2026 the cggm developers" in text
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata
    assert "Project-URL: Repository, https://github.com/cggm-dev/cggm" in metadata

    members = [Path(m).relative_to(Path(m).parts[0]).as_posix() for m in tarfile.open(sdist).getnames()
               if len(Path(m).parts) > 1]
    assert "LICENSE" in members and "src/cggm/py.typed" in members


def _links(markdown: str) -> list[str]:
    """Link and image targets outside code: [text](target), reference definitions, href/src."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)", text)
    targets += re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?\s*$", text, flags=re.M)
    targets += re.findall(r"""(?:href|src)\s*=\s*["']([^"']+)""", text)
    return targets


def test_links_helper_finds_relative_links():
    md = "see [dev](DEVELOPERS.md), ![x](img/a.png), [b](#anchor)\n[ref]: docs/x.md\n`[c](code.md)`\n"
    assert _links(md) == ["DEVELOPERS.md", "img/a.png", "#anchor", "docs/x.md"]


def test_readme_links_are_absolute():
    """PyPI renders README.md alone: a relative link or an in-page anchor is dead there."""
    readme = (ROOT / "README.md").read_text()
    links = _links(readme)
    relative = [t for t in links if not re.match(r"(https?://|mailto:)", t)]
    assert not relative, f"README.md has links that break on the package index: {relative}"
    repo = _pyproject()["project"]["urls"]["Repository"].rstrip("/")
    for t in links:  # links into this repository name files that exist
        if t.startswith(repo + "/blob/") or t.startswith(repo + "/tree/"):
            path = t[len(repo) + 1:].split("/", 2)[2].split("#")[0]
            assert (ROOT / path).exists(), f"README links to {t}, but {path} is not in the repository"


def test_make_install_installs_every_extra():
    """`make test` on a clean clone runs every test: no test is skipped for an extra that `make
    install` leaves out (the TensorBoard test was)."""
    [extras] = re.findall(r'-e "\.\[([^\]]+)\]"', (ROOT / "Makefile").read_text())
    missing = set(_pyproject()["project"]["optional-dependencies"]) - set(extras.split(","))
    assert not missing, f"make install leaves out the extras {sorted(missing)}: add them to the Makefile's -e line"
