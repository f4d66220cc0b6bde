"""Shared helpers of the paper-dataset and audio-visual loaders: file checks, a numpy-only unpickler,
array checks, and the feature caches' settings hash, memory-mapped reads and safe building (a
unique temporary folder renamed into place, a lock so that concurrent processes build it once,
and disk space reserved before anything is written)."""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..base import DataError


def existing_file(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{p}: {what} not found (the file does not exist).")
    return p


def existing_dir(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(f"{p}: {what} not found (the folder does not exist).")
    return p


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only; anything else (arbitrary classes or
    functions, which a malicious pickle would need to run code) is refused."""

    _ALLOWED: ClassVar[frozenset] = frozenset({
        ("collections", "OrderedDict"), ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"),
        ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"), ("builtins", "slice"),
        ("_codecs", "encode"),
    })
    _NUMPY_NAMES: ClassVar[frozenset] = frozenset({"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer", "frombuffer"})

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED or (module.split(".")[0] == "numpy" and name in self._NUMPY_NAMES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only containers and numpy arrays are allowed)")


def load_pickle(path: Path):
    """Load a pickle of dicts and numpy arrays (MulT / MultiBench feature files)."""
    try:
        with open(path, "rb") as f:
            try:
                return _NumpyUnpickler(f).load()
            except UnicodeDecodeError:  # pickles written by Python 2
                f.seek(0)
                return _NumpyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as err:
        raise DataError(f"{path}: cannot read the pickle: {err}") from err


def check_finite(x: np.ndarray, where: str) -> None:
    """DataError naming ``where`` if ``x`` has NaN or inf values."""
    if np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(x)
        if bad.any():
            first = np.argwhere(bad)[0].tolist()
            n_nan, n_inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
            raise DataError(f"{where}: {n_nan} NaN and {n_inf} inf values (first at index {first}).")


def as_float_array(x, where: str, ndim: int | None = None) -> np.ndarray:
    try:
        arr = np.asarray(x)
    except Exception as err:  # pragma: no cover - exotic objects
        raise DataError(f"{where}: not an array: {err}") from err
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"{where}: expected a numeric array, got dtype {arr.dtype}.")
    if ndim is not None and arr.ndim != ndim:
        raise DataError(f"{where}: expected a {ndim}-d array, got shape {arr.shape}.")
    return arr.astype(np.float32, copy=False)


def check_class_labels(y: np.ndarray, num_classes: int, source: str, unit: str = "samples") -> None:
    """A split's class labels are in ``[0, num_classes)`` and the split is not empty."""
    if len(y) == 0:
        raise DataError(f"{source}: the split is empty (0 {unit}).")
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"{source}: labels range over [{y.min()}, {y.max()}] but the task has {num_classes} classes.")


def sorted_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` in increasing order (reads from a memory map are faster in order) and the
    permutation that puts what was read back in the requested order: ``x[sorted][inverse]``."""
    order = np.argsort(rows, kind="stable")
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return rows[order], inverse


def settings_hash(settings: dict) -> str:
    """The short hash that names a feature cache built with these settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def open_cached_array(file: Path, ndim: int, cache: str) -> np.ndarray:
    """A memory-mapped ``ndim``-d array of a feature cache, or a DataError naming the file (``cache``
    says which cache it belongs to and how to rebuild it)."""
    if not file.is_file():
        raise DataError(f"{file}: not found (part of {cache}).")
    try:
        x = np.load(file, mmap_mode="r", allow_pickle=False)
    except Exception as err:
        raise DataError(f"{file}: cannot read: {err}") from err
    if x.ndim != ndim:
        raise DataError(f"{file}: expected a {ndim}-d array, got shape {x.shape}.")
    return x


# -- building a cache safely ---------------------------------------------------------------------
def files_signature(entries) -> str:
    """A hash of ``(name, size, mtime_ns)`` of each file in ``entries`` (paths, in a fixed order): it
    changes when a file is replaced, rewritten, grown or cut, without reading the files."""
    h = hashlib.sha256()
    for f in entries:
        st = os.stat(f)
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@contextmanager
def build_lock(out: Path, log: Callable[[str], None] | None = None) -> Iterator[bool]:
    """An exclusive lock on ``<out>.lock`` (``fcntl.flock``; released when the process ends, also by
    a crash). A second process waits here until the first is done. Yields False where the file
    system has no locks (then concurrent builders each build a copy and the first complete one wins)."""
    try:
        import fcntl
        fd = os.open(out.with_name(out.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except (ImportError, OSError):
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log is not None:
                log(f"{out}: another process is building this cache; waiting for it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        locked = True
    except OSError:  # e.g. ENOLCK on a network file system without locks
        locked = False
    try:
        yield locked
    finally:
        os.close(fd)


def build_atomically(out: Path, build: Callable[[Path], None], complete: str = "meta.json",
                     log: Callable[[str], None] | None = None, need: Callable[[], int] | None = None) -> bool:
    """Build a cache folder ``out`` safely under concurrency: ``build(tmp)`` writes into a folder
    unique to this call (``<out>.partial-XXXX``), which is renamed to ``out`` (atomic) once
    complete (``complete`` is the file written last). Builders take :func:`build_lock`, so a
    process that finds the cache being built waits and then uses it; without locks, the first
    complete copy wins and the others are dropped. On any error the temporary folder is removed:
    no half-written cache is left; a full disk (``need()``: the bytes the cache needs) is the OSError
    of :func:`no_space_error`. Returns True if this call built the cache."""
    try:
        return _build_atomically(out, build, complete, log)
    except OSError as err:
        if need is not None and err.errno in (errno.ENOSPC, errno.EDQUOT) and "not enough disk space" not in str(err):
            raise no_space_error(out, need(), err) from err  # a small file's write ran out of space
        raise


def _build_atomically(out: Path, build: Callable[[Path], None], complete: str, log) -> bool:
    out.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(out, log) as locked:
        if (out / complete).is_file():
            return False
        if locked:  # no other builder is running: any partial folder is left over from a crash
            for stale in out.parent.glob(glob.escape(out.name) + ".partial*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".partial-", dir=out.parent))
        try:
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the cache is an ordinary folder
            build(tmp)
            if not (tmp / complete).is_file():
                raise RuntimeError(f"{tmp}: the build wrote no {complete}")  # pragma: no cover - a bug of build()
            try:
                os.rename(tmp, out)
            except OSError:
                if (out / complete).is_file():  # another process finished first: its copy is used
                    shutil.rmtree(tmp, ignore_errors=True)
                    return False
                shutil.rmtree(out, ignore_errors=True)  # an incomplete folder (an older version's leftover)
                os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return True


def no_space_error(cache: Path, need: int, err: OSError | None = None) -> OSError:
    """The OSError for a cache that does not fit on its disk: the path, the bytes needed and free, the fix."""
    try:
        free = shutil.disk_usage(cache.parent).free
    except OSError:  # pragma: no cover
        free = -1
    why = f" ({err.strerror or err})" if err is not None else ""
    return OSError(errno.ENOSPC, (
        f"{cache}: not enough disk space to build this cache{why}: it needs {need} bytes ({need / 2**30:.2f} GiB) "
        f"and {free} bytes ({free / 2**30:.2f} GiB) are free there. Free space on that disk, or set "
        f"dataset.options.cache_dir to a folder on a disk with room. Nothing was kept: the partial cache was "
        f"removed."))


def reserve_arrays(cache: Path, arrays: dict[Path, tuple[np.dtype, tuple[int, ...]]]) -> dict[Path, np.memmap]:
    """Memory-mapped ``.npy`` arrays (``file: (dtype, shape)``) with their disk space allocated up
    front (``os.posix_fallocate``, else by writing zeros), so that a full disk is an OSError here
    (:func:`no_space_error`, naming ``cache``) rather than a bus error on a later write to the map."""
    need = sum(int(np.dtype(d).itemsize * np.prod(shape, dtype=np.int64)) + 128 for d, shape in arrays.values())
    try:
        free = shutil.disk_usage(cache.parent).free
    except OSError:  # pragma: no cover
        free = None
    if free is not None and free < need:
        raise no_space_error(cache, need)
    out = {}
    for file, (dtype, shape) in arrays.items():
        arr = np.lib.format.open_memmap(file, "w+", dtype, shape)
        size, data = file.stat().st_size, arr.nbytes
        try:
            _allocate(file, size - data, data)
        except OSError as err:
            del arr
            if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise no_space_error(cache, need, err) from err
            raise
        out[file] = arr
    return out


def _allocate(file: Path, offset: int, length: int) -> None:
    """Disk blocks for ``length`` bytes of ``file`` from ``offset`` (its data, already zero)."""
    if length <= 0:
        return
    with open(file, "r+b") as f:
        fallocate = getattr(os, "posix_fallocate", None)
        if fallocate is not None:
            try:
                fallocate(f.fileno(), offset, length)
                return
            except OSError as err:
                if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        f.seek(offset)  # no fallocate here: write the zeros, so a full disk fails now
        block = bytes(1 << 20)
        left = length
        while left > 0:
            left -= f.write(block[: min(left, len(block))])
        f.flush()
        os.fsync(f.fileno())
