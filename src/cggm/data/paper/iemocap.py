"""IEMOCAP (4 emotions) from the MMIN feature release (Zhao et al., ACL 2021), as the CGGM code reads it.

Folder layout (``path`` is the feature root, MMIN's ``feature_root``)::

    path/A/comparE.h5              one dataset per utterance id, float (T_a, 130), frame-level ComParE
    path/A/comparE_mean_std.h5     optional; group "<fold>" with datasets "mean" (130,) and "std" (130,)
    path/V/denseface.h5            one dataset per utterance id, float (T_v, 342) (T_v <= 50)
    path/L/bert_large.h5           one dataset per utterance id, float (T_l, 1024) (T_l <= 22)
    path/target/<fold>/{trn,val,tst}_label.npy     (N, 4) one-hot, or (N,) class ids
    path/target/<fold>/{trn,val,tst}_int2name.npy  (N, 1) utterance ids as bytes (or (N,) strings)

``fold`` is one of the ten cross-validation folds 1..10 (MMIN's ``cvNo``; the folds are
leave-one-speaker-out over the five sessions). Class ids are the argmax of the one-hot label, in
MMIN's order (anger, happiness + excitement, neutral, sadness). The feature file names are
options (``audio``, ``vision``, ``text``) for MMIN's other feature types.

Processing:

* Audio normalisation (MMIN's ``norm_method``): ``"trn"`` (default) standardises every frame with
  the fold's training mean/std from ``comparE_mean_std.h5``; when that file is absent the mean/std
  are computed from the fold's training utterances. ``"utt"`` standardises each utterance by its
  own statistics; ``"none"`` keeps raw values. A zero std is replaced by 1.
* Variable lengths: each modality is zero-padded to the longest sequence of all three splits and
  gets a padding mask (True on real frames). Sequences longer than ``max_len[modality]`` (default
  audio 350, vision 50, text 22, the lengths the CGGM code assumes) are shortened to that many
  evenly spaced frames instead of crashing; the number shortened is in ``info["shortened"]``. An
  empty sequence becomes one zero frame marked real.
* The modality order is audio, vision, text (the paper's f1, f2, f3). Validation is the fold's
  ``val`` split, test its ``tst`` split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..._optional import require
from ...types import Task
from ..base import DataError, DataSplits, MultimodalDataset
from ..registry import register_dataset
from ._common import check_finite, existing_dir, existing_file

MODALITIES = ("audio", "vision", "text")
FOLDER = {"audio": "A", "vision": "V", "text": "L"}
KNOWN_DIMS = {"comparE": 130, "comparE_raw": 130, "denseface": 342, "bert_large": 1024, "bert_base": 768}
SPLITS = {"train": "trn", "val": "val", "test": "tst"}
CLASSES = ("anger", "happiness", "neutral", "sadness")
DEFAULT_MAX_LEN = {"audio": 350, "vision": 50, "text": 22}


def _names(file: Path) -> list[str]:
    try:
        arr = np.load(file, allow_pickle=False)
    except Exception as err:
        raise DataError(f"{file}: cannot read the utterance ids: {err}") from err
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataError(f"{file}: expected utterance ids of shape (N, 1) or (N,), got {arr.shape}.")
    return [x.decode() if isinstance(x, bytes) else str(x) for x in arr.tolist()]


def _labels(file: Path) -> np.ndarray:
    try:
        arr = np.load(file, allow_pickle=False)
    except Exception as err:
        raise DataError(f"{file}: cannot read the labels: {err}") from err
    if arr.ndim == 2:
        if arr.shape[1] != len(CLASSES):
            raise DataError(f"{file}: one-hot labels need {len(CLASSES)} columns ({', '.join(CLASSES)}), "
                            f"got shape {arr.shape}.")
        check_finite(arr.astype(np.float64), str(file))
        if arr.shape[0] and (arr.max(axis=1) <= 0).any():
            row = int(np.flatnonzero(arr.max(axis=1) <= 0)[0])
            raise DataError(f"{file}: label row {row} has no positive entry; expected one-hot rows.")
        return arr.argmax(axis=1).astype(np.int64)
    if arr.ndim == 1:
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"{file}: 1-d labels must be integer class ids, got dtype {arr.dtype}.")
        if arr.size and (arr.min() < 0 or arr.max() >= len(CLASSES)):
            raise DataError(f"{file}: labels range over [{arr.min()}, {arr.max()}]; IEMOCAP has 4 classes (0..3).")
        return arr.astype(np.int64)
    raise DataError(f"{file}: expected labels of shape (N, 4) or (N,), got {arr.shape}.")


def _shorten(x: np.ndarray, max_len: int) -> np.ndarray:
    idx = np.linspace(0, len(x) - 1, max_len).round().astype(np.int64)
    return x[idx]


def _pad(seqs: list[np.ndarray], length: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((len(seqs), length, dim), dtype=np.float32)
    mask = np.zeros((len(seqs), length), dtype=bool)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
        mask[i, : len(s)] = True
    return out, mask


@register_dataset("iemocap")
def load_iemocap(path: str, fold: int = 1, audio: str = "comparE", vision: str = "denseface",
                 text: str = "bert_large", norm: str = "trn", max_len: dict | None = None) -> DataSplits:
    """IEMOCAP, 4 classes, one cross-validation fold of the MMIN features (see the module docstring)."""
    h5py = require("h5py", "paper", "The IEMOCAP loader")
    caps = _check_options(fold, norm, max_len)
    fold = int(fold)
    root = existing_dir(path, "IEMOCAP feature root")
    feature_names = {"audio": audio, "vision": vision, "text": text}
    files = {m: existing_file(root / FOLDER[m] / f"{feature_names[m]}.h5", f"IEMOCAP {m} features") for m in MODALITIES}
    target = existing_dir(root / "target" / str(fold), f"IEMOCAP labels of fold {fold}")
    ids, labels = _fold_labels(target)

    seqs: dict[str, dict[str, list[np.ndarray]]] = {s: {} for s in SPLITS}
    dims, shortened = {}, {m: 0 for m in MODALITIES}
    for m in MODALITIES:
        per_split, shortened[m] = _read_modality(h5py, files[m], m, ids, caps[m], fold, dims)
        for split in SPLITS:
            seqs[split][m] = per_split[split]
        expected = KNOWN_DIMS.get(feature_names[m])
        if expected is not None and dims[m] != expected:
            raise DataError(f"{files[m]}: {feature_names[m]} features should have {expected} values per frame, "
                            f"got {dims[m]}.")

    mean_std_info = _normalise_audio(h5py, root, fold, audio, norm, seqs)
    lengths = {m: max(len(x) for s in SPLITS for x in seqs[s][m]) for m in MODALITIES}
    splits = {}
    for split, theirs in SPLITS.items():
        inputs, masks = {}, {}
        for m in MODALITIES:
            x, mk = _pad(seqs[split][m], lengths[m], dims[m])
            inputs[m], masks[m] = torch.from_numpy(x), torch.from_numpy(mk)
        splits[split] = MultimodalDataset(inputs, torch.from_numpy(labels[split]), masks,
                                          source=f"{target}/{theirs}")
    return DataSplits(
        name="iemocap", task=Task("classification", len(CLASSES)),
        description=f"IEMOCAP 4-class, MMIN features, fold {fold}",
        info={"fold": fold, "classes": CLASSES, "feature_dims": dims, "padded_lengths": lengths,
              "max_len": caps, "shortened": shortened, "audio_norm": norm, "audio_stats": mean_std_info,
              "sizes": {k: len(v) for k, v in splits.items()}},
        **splits)


def _check_options(fold, norm: str, max_len: dict | None) -> dict:
    """Refuses a fold outside 1..10, an unknown ``norm`` and a bad ``max_len``; the length caps,
    the defaults updated by ``max_len``."""
    if int(fold) != fold or not 1 <= int(fold) <= 10:
        raise ValueError(f"IEMOCAP fold must be 1..10, got {fold!r}.")
    if norm not in ("trn", "utt", "none"):
        raise ValueError(f"norm must be 'trn', 'utt' or 'none', got {norm!r}.")
    caps = dict(DEFAULT_MAX_LEN, **(max_len or {}))
    for m, v in caps.items():
        if m not in MODALITIES or int(v) < 1:
            raise ValueError(f"max_len: expected positive lengths for {MODALITIES}, got {m}={v!r}.")
    return caps


def _fold_labels(target: Path) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    """Per split, the fold's utterance ids and their class ids (as many of each)."""
    ids, labels = {}, {}
    for ours, theirs in SPLITS.items():
        ids[ours] = _names(existing_file(target / f"{theirs}_int2name.npy", f"utterance ids of {theirs}"))
        label_file = existing_file(target / f"{theirs}_label.npy", f"labels of {theirs}")
        labels[ours] = _labels(label_file)
        if len(labels[ours]) != len(ids[ours]):
            raise DataError(f"{label_file}: {len(labels[ours])} labels but {theirs}_int2name.npy lists "
                            f"{len(ids[ours])} utterances.")
    return ids, labels


def _read_modality(h5py, file: Path, m: str, ids: dict[str, list[str]], cap, fold: int,
                   dims: dict[str, int]) -> tuple[dict[str, list[np.ndarray]], int]:
    """Modality ``m``'s sequences of every split, in ``ids``' order, from its HDF5 file, and how many
    were shortened to ``cap`` frames; its feature size goes into ``dims`` (from the first utterance)."""
    try:
        h5 = h5py.File(file, "r")
    except OSError as err:
        raise DataError(f"{file}: cannot open as HDF5: {err}") from err
    seqs, shortened = {}, 0
    with h5:
        for split, theirs in SPLITS.items():
            out = []
            for name in ids[split]:
                if name not in h5:
                    raise DataError(f"{file}: no features for utterance {name!r} (listed in fold {fold}, "
                                    f"{theirs}).")
                x, cut = _utterance(h5[name][()], f"{file}: utterance {name!r}", m, cap, dims)
                shortened += cut
                out.append(x)
            seqs[split] = out
    return seqs, shortened


def _utterance(raw, where: str, m: str, cap, dims: dict[str, int]) -> tuple[np.ndarray, int]:
    """One utterance's frames ``(T, dim)`` checked (2-d, ``dims[m]`` features, finite), shortened to
    ``cap`` frames (then 1 is returned with it, else 0); an empty one becomes one zero frame."""
    x = np.asarray(raw, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise DataError(f"{where} has shape {x.shape}; expected (frames, features).")
    dims.setdefault(m, x.shape[1])
    if x.shape[1] != dims[m]:
        raise DataError(f"{where} has {x.shape[1]} features, other utterances have {dims[m]}.")
    check_finite(x, where)
    cut = 0
    if len(x) > cap:
        x = _shorten(x, int(cap))
        cut = 1
    if len(x) == 0:
        x = np.zeros((1, dims[m]), dtype=np.float32)
    return x, cut


def _normalise_audio(h5py, root: Path, fold: int, audio: str, norm: str,
                     seqs: dict[str, dict[str, list[np.ndarray]]]) -> str:
    """Normalises the audio of every split in place (module docstring); what the statistics were
    (``"none"`` unless ``norm="trn"``)."""
    mean_std_info = "none"
    if norm == "trn":
        mean, std, mean_std_info = _train_stats(h5py, root, fold, audio, seqs["train"]["audio"])
        for split in SPLITS:
            seqs[split]["audio"] = [(x - mean) / std for x in seqs[split]["audio"]]
    elif norm == "utt":
        for split in SPLITS:
            seqs[split]["audio"] = [_utt_norm(x) for x in seqs[split]["audio"]]
    return mean_std_info


def _utt_norm(x: np.ndarray) -> np.ndarray:
    if len(x) < 2:
        return x - x.mean(axis=0, keepdims=True)
    std = x.std(axis=0, ddof=1, keepdims=True)
    std[std == 0] = 1.0
    return (x - x.mean(axis=0, keepdims=True)) / std


def _train_stats(h5py, root: Path, fold: int, audio: str, train_audio: list[np.ndarray]):
    file = root / "A" / f"{audio}_mean_std.h5"
    if file.is_file():
        try:
            with h5py.File(file, "r") as h5:
                if str(fold) not in h5:
                    raise DataError(f"{file}: no group {str(fold)!r} (fold {fold}); it has {sorted(h5)}.")
                mean = np.asarray(h5[str(fold)]["mean"][()], dtype=np.float32).reshape(1, -1)
                std = np.asarray(h5[str(fold)]["std"][()], dtype=np.float32).reshape(1, -1)
        except (OSError, KeyError) as err:
            raise DataError(f"{file}: cannot read mean/std of fold {fold}: {err}") from err
        where = str(file)
    else:
        frames = np.concatenate(train_audio, axis=0)
        mean, std = frames.mean(axis=0, keepdims=True), frames.std(axis=0, keepdims=True)
        where = f"computed from the {len(train_audio)} training utterances of fold {fold}"
    dim = train_audio[0].shape[1]
    if mean.shape[1] != dim or std.shape[1] != dim:
        raise DataError(f"{file}: mean/std have {mean.shape[1]}/{std.shape[1]} values, the audio features {dim}.")
    check_finite(mean, f"{file}: mean")
    check_finite(std, f"{file}: std")
    std = np.where(std == 0, np.float32(1.0), std)
    return mean, std, where
