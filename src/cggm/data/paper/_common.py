"""Shared helpers of the paper-dataset and audio-visual loaders: file checks, a numpy-only unpickler,
array checks, and the feature caches' settings hash and memory-mapped reads."""

from __future__ import annotations

import hashlib
import json
import pickle
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
