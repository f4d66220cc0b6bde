"""CMU-MOSI and CMU-MOSEI from the aligned-feature pickle used by MulT, MultiBench and the CGGM code.

File format (``mosi_data.pkl`` for MOSI, ``mosei_senti_data.pkl`` for MOSEI)::

    {"train": split, "valid": split, "test": split}
    split = {"text":   float array (N, T, 300)   GloVe word vectors (MOSEI: 300 as well)
             "audio":  float array (N, T, 5)     COVAREP (MOSEI: 74)
             "vision": float array (N, T, 20)    Facet (MOSEI: 35)
             "labels": float array (N, 1, 1)     sentiment in [-3, 3]
             ... other keys (e.g. "id") are ignored}

T is 50 in the published files; the three modalities are word-aligned, so they share T.
The modality order is text, audio, vision (as in the official code).

Handling of the published quirks:

* ``-inf`` in audio. Some COVAREP values are ``-inf`` in the published MOSI file. They are
  replaced by 0 (MulT's convention), and the number replaced is reported in
  ``DataSplits.info["audio_neg_inf_replaced"]``. ``NaN`` or ``+inf`` anywhere, or ``-inf`` in
  text or vision, is an error.
* Padding. Short utterances are zero-padded up to T. A time step is marked real in the padding
  mask (True) when any of the three modalities is non-zero there; the mask is shared by the
  modalities, because they are aligned. A sample with no non-zero step keeps all steps real (a
  fully masked sequence has no defined attention).
* Validation is the file's ``valid`` split; ``test`` is used only for the final evaluation.

The pickle is read with an unpickler that only accepts containers and numpy arrays, so a
tampered file cannot run code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...types import Task
from ..base import DataError, DataSplits, MultimodalDataset
from ..registry import register_dataset
from ._common import as_float_array, check_finite, existing_file, load_pickle

MODALITIES = ("text", "audio", "vision")
SPLITS = {"train": "train", "val": "valid", "test": "test"}
DEFAULT_FILES = {"mosi": ("mosi_data.pkl", "aligned_50.pkl"), "mosei": ("mosei_senti_data.pkl", "aligned_50.pkl")}
LABEL_RANGE = 3.0


def _resolve(path: str | Path, name: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in DEFAULT_FILES[name]:
            if (p / candidate).is_file():
                return p / candidate
        raise DataError(f"{p}: no {name.upper()} feature file found; expected one of {list(DEFAULT_FILES[name])} "
                        f"in this folder, or pass the file itself as path.")
    return existing_file(p, f"{name.upper()} feature pickle")


def _load_split(raw: dict, key: str, file: Path, neg_inf: str) -> tuple[dict, np.ndarray, int]:
    if key not in raw or not isinstance(raw[key], dict):
        raise DataError(f"{file}: missing split {key!r} (the file has keys {sorted(map(str, raw))}; expected "
                        f"'train', 'valid' and 'test').")
    split = raw[key]
    missing = [k for k in (*MODALITIES, "labels") if k not in split]
    if missing:
        raise DataError(f"{file}: split {key!r} lacks {missing} (it has {sorted(map(str, split))}).")
    arrays = {m: as_float_array(split[m], f"{file}: {key}/{m}", ndim=3) for m in MODALITIES}
    replaced = 0
    audio = arrays["audio"]
    if neg_inf == "zero":
        neg = np.isneginf(audio)
        replaced = int(neg.sum())
        if replaced:
            audio = np.where(neg, np.float32(0.0), audio)
            arrays["audio"] = audio
    for m, x in arrays.items():
        check_finite(x, f"{file}: {key}/{m}")
    labels = as_float_array(split["labels"], f"{file}: {key}/labels")
    n = arrays["text"].shape[0]
    if labels.size != n:
        raise DataError(f"{file}: {key}/labels has shape {labels.shape}, expected ({n}, 1, 1): one label per sample.")
    labels = labels.reshape(n)
    check_finite(labels, f"{file}: {key}/labels")
    for m, x in arrays.items():
        if x.shape[0] != n:
            raise DataError(f"{file}: {key}/{m} has {x.shape[0]} samples but {key}/text has {n}.")
        if x.shape[1] != arrays["text"].shape[1]:
            raise DataError(f"{file}: {key}/{m} has {x.shape[1]} time steps but {key}/text has "
                            f"{arrays['text'].shape[1]}; the aligned format needs equal lengths.")
    lo, hi = float(labels.min()), float(labels.max())
    if lo < -LABEL_RANGE - 1e-6 or hi > LABEL_RANGE + 1e-6:
        raise DataError(f"{file}: {key}/labels range over [{lo:.3g}, {hi:.3g}]; sentiment labels must lie in [-3, 3].")
    return arrays, labels, replaced


def padding_mask(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """``[N, T]`` bool: a step is real when any modality is non-zero there; never all False."""
    real = np.zeros(arrays["text"].shape[:2], dtype=bool)
    for x in arrays.values():
        real |= np.abs(x).sum(axis=2) > 0
    real[~real.any(axis=1)] = True
    return real


def load_cmu(name: str, path: str | Path, file: str | None = None, neg_inf: str = "zero",
             masks: bool = True, regression_metric: str = "neg_mae") -> DataSplits:
    if neg_inf not in ("zero", "error"):
        raise ValueError(f"neg_inf must be 'zero' or 'error', got {neg_inf!r}.")
    src = _resolve(Path(path) / file if file else path, name)
    raw = load_pickle(src)
    if not isinstance(raw, dict):
        raise DataError(f"{src}: expected a dict with 'train', 'valid' and 'test', got {type(raw).__name__}.")
    splits, dims, replaced = {}, None, {}
    for ours, theirs in SPLITS.items():
        arrays, labels, n_inf = _load_split(raw, theirs, src, neg_inf)
        replaced[ours] = n_inf
        shape = {m: x.shape[2] for m, x in arrays.items()}
        if dims is None:
            dims = shape
        elif shape != dims:
            raise DataError(f"{src}: split {theirs!r} has feature sizes {shape} but 'train' has {dims}.")
        mask = padding_mask(arrays) if masks else None
        splits[ours] = MultimodalDataset(
            {m: torch.from_numpy(np.ascontiguousarray(arrays[m])) for m in MODALITIES},
            torch.from_numpy(labels.astype(np.float32)),
            None if mask is None else {m: torch.from_numpy(mask) for m in MODALITIES},
            source=f"{src}[{theirs}]")
    return DataSplits(
        name=name, task=Task("regression", 1, regression_metric=regression_metric),
        description=f"CMU-{name.upper()} aligned features from {src}",
        info={"file": str(src), "feature_dims": dims, "audio_neg_inf_replaced": replaced,
              "sizes": {k: len(v) for k, v in splits.items()}},
        **splits)


@register_dataset("mosi")
def load_mosi(path: str, file: str | None = None, neg_inf: str = "zero", masks: bool = True,
              regression_metric: str = "neg_mae") -> DataSplits:
    """CMU-MOSI (see the module docstring). ``path``: the pickle, or the folder holding it."""
    return load_cmu("mosi", path, file, neg_inf, masks, regression_metric)


@register_dataset("mosei")
def load_mosei(path: str, file: str | None = None, neg_inf: str = "zero", masks: bool = True,
               regression_metric: str = "neg_mae") -> DataSplits:
    """CMU-MOSEI in the same format (``mosei_senti_data.pkl``)."""
    return load_cmu("mosei", path, file, neg_inf, masks, regression_metric)
