"""BraTS 2021 (4 MRI sequences; whole tumour, tumour core, enhancing tumour) as 2D slices.

Raw layout (``path``; the RSNA-ASNR-MICCAI BraTS 2021 training data as distributed)::

    path/BraTS2021_00000/BraTS2021_00000_flair.nii.gz
    path/BraTS2021_00000/BraTS2021_00000_t1.nii.gz
    path/BraTS2021_00000/BraTS2021_00000_t1ce.nii.gz
    path/BraTS2021_00000/BraTS2021_00000_t2.nii.gz
    path/BraTS2021_00000/BraTS2021_00000_seg.nii.gz    labels 0 background, 1 necrotic core,
    ...                                                 2 oedema, 4 enhancing tumour

Every sub-folder holding NIfTI files is a case; a case needs the five files ``<folder>_<name>``
(``.nii.gz`` or ``.nii``). Reading NIfTI needs the ``paper`` extra (``nibabel``).

Preprocessing (once per case, cached as ``.npy`` under ``cache_dir``, default
``path/cggm_cache/brats_crop<crop>/``):

* per-volume normalisation: each sequence is standardised by the mean and std of its non-zero
  (brain) voxels; background stays 0;
* label 4 (enhancing tumour) becomes 3, so the classes are 0..3 (3 is also accepted as input);
* axial slices (the last NIfTI axis) are centre-cropped to ``crop`` x ``crop`` (default 160, the
  official code's size; ``crop=None`` keeps the full 240 x 240). Tumour voxels outside the crop are
  not lost for evaluation: they count as missed (false negatives) in the Dice.

Split: at the CASE level (never slices of one case in two splits). The sorted case names are
shuffled with ``seed`` (default 0) and cut into ``fractions`` (default 70 % train, 10 % validation,
20 % test). ``split_file`` (JSON ``{"train": [...], "val": [...], "test": [...]}`` of case names)
fixes the split explicitly instead.

Training samples (the paper treats BraTS "as a 2D segmentation task by randomly slicing an image
from the 3D image"): an epoch has ``slices_per_case`` samples per training case; each draws one
axial slice of its case at random (torch's global generator, seeded and checkpointed by the
engine; default 1 sample per case per epoch, as in the official code): with probability ``tumour_fraction`` (default 0.5) among the case's slices that contain
tumour, otherwise among all slices that contain brain. With ``augment=True`` (default) the slice is
randomly flipped along each axis and each sequence's brain voxels are scaled by U(0.9, 1.1) and
shifted by U(-0.1, 0.1).

Evaluation (validation and test; :meth:`BratsVolumes.eval_metric`, a
:class:`~cggm.metrics.volume.VolumeDice` fed by the one evaluation step) is deterministic: EVERY axial
slice of every case is predicted, the slices are stacked back into a volume, and the Dice of WT
(labels 1, 2, 3), TC (1, 3) and ET (3) is computed per case on the volume (1 when both prediction
and ground truth are empty, 0 when only one is), then averaged over cases; ``dice_mean`` is the
mean of the three. No augmentation is applied at evaluation.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..._optional import require
from ...metrics.functional import brats_regions
from ...metrics.volume import VolumeDice
from ...types import Task
from ..base import DataError, DataSplits
from ..registry import register_dataset
from ._common import existing_dir

SEQUENCES = ("flair", "t1", "t1ce", "t2")
REGIONS = ("wt", "tc", "et")
CLASS_WEIGHTS = (0.2, 0.3, 0.25, 0.25)  # the paper's weighted cross-entropy
CACHE_VERSION = 1


# -- preprocessing ----------------------------------------------------------------------------------
def _nifti(folder: Path, case: str, name: str) -> Path:
    for ext in (".nii.gz", ".nii"):
        f = folder / f"{case}_{name}{ext}"
        if f.is_file():
            return f
    raise DataError(f"{folder / f'{case}_{name}.nii.gz'}: missing (case {case} needs {', '.join(SEQUENCES)} and seg).")


def _read(nib, file: Path) -> np.ndarray:
    try:
        x = np.asarray(nib.load(str(file)).dataobj, dtype=np.float32)
    except Exception as err:
        raise DataError(f"{file}: cannot read as NIfTI: {err}") from err
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3:
        raise DataError(f"{file}: expected a 3-d volume, got shape {x.shape}.")
    return x


def _crop_box(size: int, crop: int | None) -> tuple[int, int, int]:
    """(start in the source, start in the target, length) of a centre crop/pad of ``size`` to ``crop``."""
    if crop is None or crop == size:
        return 0, 0, size
    if size >= crop:
        return (size - crop) // 2, 0, crop
    return 0, (crop - size) // 2, size


def preprocess_case(folder: str | Path, out_dir: str | Path, crop: int | None) -> dict:
    """Normalise, relabel and crop one case; write ``<case>_img.npy`` ([D, 4, c, c] float16) and
    ``<case>_seg.npy`` ([D, c, c] uint8) to ``out_dir`` and return the case's metadata."""
    nib = require("nibabel", "paper", "The BraTS loader")
    folder, out_dir = Path(folder), Path(out_dir)
    case = folder.name
    files = {name: _nifti(folder, case, name) for name in (*SEQUENCES, "seg")}
    vols = {name: _read(nib, f) for name, f in files.items()}
    shape = vols["seg"].shape
    for name, v in vols.items():
        if v.shape != shape:
            raise DataError(f"{files[name]}: shape {v.shape} differs from the segmentation's {shape}.")
        bad = ~np.isfinite(v)
        if bad.any():
            raise DataError(f"{files[name]}: {int(bad.sum())} NaN/inf voxels (first at {np.argwhere(bad)[0].tolist()}).")
    seg = vols["seg"]
    if not np.all(seg == np.round(seg)):
        raise DataError(f"{files['seg']}: labels must be integers, found non-integer values.")
    values = set(np.unique(seg).astype(int).tolist())
    if not values <= {0, 1, 2, 3, 4}:
        raise DataError(f"{files['seg']}: labels {sorted(values - {0, 1, 2, 3, 4})} are out of range; "
                        f"BraTS labels are 0, 1, 2 and 4.")
    seg = seg.astype(np.uint8)
    seg[seg == 4] = 3
    full_counts = {k: int(v.sum()) for k, v in brats_regions(seg).items()}

    H, W, D = shape
    c_h = crop if crop is not None else H
    c_w = crop if crop is not None else W
    (sh, th, lh), (sw, tw, lw) = _crop_box(H, crop), _crop_box(W, crop)
    img = np.zeros((D, len(SEQUENCES), c_h, c_w), dtype=np.float16)
    for k, name in enumerate(SEQUENCES):
        v = vols[name]
        brain = v != 0
        if brain.any():
            mean, std = float(v[brain].mean()), float(v[brain].std())
            v = np.where(brain, (v - mean) / (std if std > 0 else 1.0), 0.0)
        img[:, k, th:th + lh, tw:tw + lw] = np.transpose(v[sh:sh + lh, sw:sw + lw, :], (2, 0, 1))
    lab = np.zeros((D, c_h, c_w), dtype=np.uint8)
    lab[:, th:th + lh, tw:tw + lw] = np.transpose(seg[sh:sh + lh, sw:sw + lw, :], (2, 0, 1))
    brain_slices = np.flatnonzero((img != 0).reshape(D, -1).any(axis=1)).tolist()
    tumour_slices = np.flatnonzero(lab.reshape(D, -1).any(axis=1)).tolist()
    out_dir.mkdir(parents=True, exist_ok=True)
    for suffix, arr in (("img", img), ("seg", lab)):
        tmp = out_dir / f"{case}_{suffix}.tmp.npy"
        np.save(tmp, arr)
        os.replace(tmp, out_dir / f"{case}_{suffix}.npy")
    return {"case": case, "depth": int(D), "size": [c_h, c_w], "brain_slices": brain_slices,
            "tumour_slices": tumour_slices, "full_counts": full_counts,
            "source": {n: [f.stat().st_size, int(f.stat().st_mtime)] for n, f in files.items()}}


def _find_cases(root: Path, cache: Path) -> list[Path]:
    cases = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if d.resolve() == cache.resolve() or cache.resolve().is_relative_to(d.resolve()):
            continue
        if any(f.name.endswith((".nii", ".nii.gz")) for f in d.iterdir()):
            cases.append(d)
    if not cases:
        raise DataError(f"{root}: no BraTS case folders found (sub-folders with <case>_flair.nii.gz, ...).")
    return cases


def prepare_cache(root: Path, cache: Path, crop: int | None, workers: int = 1, log=print) -> dict[str, dict]:
    """Preprocess every case not yet cached (or changed since) and return the metadata by case."""
    cases = _find_cases(root, cache)
    cache.mkdir(parents=True, exist_ok=True)
    index_file = cache / "index.json"
    index = {}
    if index_file.is_file():
        try:
            saved = json.loads(index_file.read_text())
            if saved.get("version") == CACHE_VERSION and saved.get("crop") == crop:
                index = saved.get("cases", {})
        except json.JSONDecodeError:
            index = {}
    todo = []
    for d in cases:
        meta = index.get(d.name)
        if meta is None or not (cache / f"{d.name}_img.npy").is_file() or not (cache / f"{d.name}_seg.npy").is_file() \
                or not _same_source(d, meta):
            todo.append(d)
    if todo:
        if log is not None:
            log(f"brats: preprocessing {len(todo)} of {len(cases)} cases into {cache}")
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                metas = list(pool.map(preprocess_case, todo, [cache] * len(todo), [crop] * len(todo)))
        else:
            metas = [preprocess_case(d, cache, crop) for d in todo]
        for m in metas:
            index[m["case"]] = m
        tmp = index_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "crop": crop, "cases": index}))
        os.replace(tmp, index_file)
    return {d.name: index[d.name] for d in cases}


def _same_source(folder: Path, meta: dict) -> bool:
    try:
        for name, (size, mtime) in meta["source"].items():
            f = _nifti(folder, folder.name, name)
            if f.stat().st_size != size or int(f.stat().st_mtime) != mtime:
                return False
    except (DataError, KeyError, ValueError, TypeError):
        return False
    return True


# -- datasets -----------------------------------------------------------------------------------
class _BratsBase:
    def __init__(self, cache: Path, metas: list[dict], source: str):
        if not metas:
            raise DataError(f"{source}: the split has no case.")
        self.cache, self.metas, self.source = cache, metas, source
        h, w = metas[0]["size"]
        self.size = (int(h), int(w))

    @property
    def modalities(self) -> tuple[str, ...]:
        return SEQUENCES

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {m: (1, *self.size) for m in SEQUENCES}

    @property
    def cases(self) -> list[str]:
        return [m["case"] for m in self.metas]

    def check_task(self, task: Task) -> None:
        if not task.one_of(("segmentation",)) or task.num_outputs != 4:
            raise DataError(f"{self.source}: BraTS is a 4-class segmentation task, got {task.kind} with "
                            f"{task.num_outputs} outputs.")

    def _arrays(self, case: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            img = np.load(self.cache / f"{case}_img.npy", mmap_mode="r")
            seg = np.load(self.cache / f"{case}_seg.npy", mmap_mode="r")
        except (OSError, ValueError) as err:
            raise DataError(f"{self.cache}: cached case {case} is unreadable ({err}); delete the cache folder.") from err
        return img, seg

    def _item(self, case: str, z: int, augment: bool = False):
        img, seg = self._arrays(case)
        x = torch.from_numpy(np.asarray(img[z], dtype=np.float32))  # [4, h, w]
        y = torch.from_numpy(np.asarray(seg[z], dtype=np.int64))
        if augment:
            x, y = _augment(x, y)
        return {m: x[k:k + 1] for k, m in enumerate(SEQUENCES)}, {}, y


def _augment(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    for axis in (-1, -2):
        if bool(torch.rand(()) < 0.5):
            x, y = x.flip(axis), y.flip(axis)
    brain = x != 0
    scale = torch.empty(x.shape[0], 1, 1).uniform_(0.9, 1.1)
    shift = torch.empty(x.shape[0], 1, 1).uniform_(-0.1, 0.1)
    x = torch.where(brain, x * scale + shift, x)
    return x.contiguous(), y.contiguous()


class BratsSlices(_BratsBase):
    """Training split: ``slices_per_case`` random slices per case per epoch (see the module docstring)."""

    def __init__(self, cache: Path, metas: list[dict], source: str, slices_per_case: int = 1,
                 tumour_fraction: float = 0.5, augment: bool = True):
        super().__init__(cache, metas, source)
        self.slices_per_case, self.tumour_fraction, self.augment = int(slices_per_case), float(tumour_fraction), augment

    def __len__(self) -> int:
        return len(self.metas) * self.slices_per_case

    def __getitem__(self, i: int):
        meta = self.metas[int(i) % len(self.metas)]
        pool = meta["tumour_slices"] if meta["tumour_slices"] and bool(torch.rand(()) < self.tumour_fraction) \
            else (meta["brain_slices"] or list(range(meta["depth"])))
        z = pool[int(torch.randint(len(pool), ()))]
        return self._item(meta["case"], z, self.augment)


class BratsVolumes(_BratsBase):
    """Validation / test split: every slice of every case, in order; scored per volume."""

    def __init__(self, cache: Path, metas: list[dict], source: str):
        super().__init__(cache, metas, source)
        self.offsets = np.cumsum([0] + [m["depth"] for m in metas])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        k = int(np.searchsorted(self.offsets, int(i), side="right") - 1)
        return self._item(self.metas[k]["case"], int(i) - int(self.offsets[k]))

    def eval_metric(self) -> VolumeDice:
        """The split's own metric (replacing the task's slice metrics): per-case volume Dice of WT,
        TC and ET averaged over cases, and the mean slice loss; fed :meth:`eval_batches` in order."""
        return VolumeDice([m["depth"] for m in self.metas], [m["full_counts"] for m in self.metas])

    def eval_batches(self, batch_size: int):
        """``(inputs, masks, target)`` of every slice of every case, in order, ``batch_size`` slices
        at most and never two cases in one batch (the loss of a batch is over its slices)."""
        for meta in self.metas:
            img, seg = self._arrays(meta["case"])
            for start in range(0, meta["depth"], batch_size):
                x = torch.from_numpy(np.asarray(img[start:start + batch_size], dtype=np.float32))
                y = torch.from_numpy(np.asarray(seg[start:start + batch_size], dtype=np.int64))
                yield {m: x[:, k:k + 1] for k, m in enumerate(SEQUENCES)}, {}, y


def case_split(cases: list[str], fractions=(0.7, 0.1, 0.2), seed: int = 0) -> dict[str, list[str]]:
    """Seeded case-level split of the sorted case names into train / val / test."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}.")
    names = sorted(cases)
    if len(names) < 3:
        raise DataError(f"BraTS needs at least 3 cases for a train/val/test split, found {len(names)}.")
    order = np.random.default_rng(seed).permutation(len(names))
    n_val = max(1, round(fractions[1] * len(names)))
    n_test = max(1, round(fractions[2] * len(names)))
    n_train = len(names) - n_val - n_test
    if n_train < 1:
        raise DataError(f"BraTS: {len(names)} cases are too few for fractions {fractions}.")
    pick = [names[i] for i in order]
    return {"train": sorted(pick[:n_train]), "val": sorted(pick[n_train:n_train + n_val]),
            "test": sorted(pick[n_train + n_val:])}


@register_dataset("brats")
def load_brats(path: str, cache_dir: str | None = None, crop: int | None = 160,
               fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), seed: int = 0, split_file: str | None = None,
               slices_per_case: int = 1, tumour_fraction: float = 0.5, augment: bool = True,
               workers: int = 1) -> DataSplits:
    """BraTS 2021 as 2D slices with volume-level evaluation (see the module docstring)."""
    if crop is not None and int(crop) < 16:
        raise ValueError(f"crop must be >= 16 or None, got {crop}.")
    if not 0 <= tumour_fraction <= 1:
        raise ValueError(f"tumour_fraction must be in [0, 1], got {tumour_fraction}.")
    if int(slices_per_case) < 1:
        raise ValueError(f"slices_per_case must be >= 1, got {slices_per_case}.")
    root = existing_dir(path, "BraTS 2021 folder")
    crop = None if crop is None else int(crop)
    cache = Path(cache_dir).expanduser() if cache_dir else root / "cggm_cache" / f"brats_crop{crop or 'full'}"
    metas = prepare_cache(root, cache, crop, int(workers))
    sizes = {tuple(m["size"]) for m in metas.values()}
    if len(sizes) > 1:
        raise DataError(f"{root}: cases have different slice sizes {sorted(sizes)}; set crop to a common size.")
    if split_file is not None:
        sf = Path(split_file).expanduser()
        try:
            parts = json.loads(sf.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"{sf}: cannot read the split file: {err}") from err
        if not isinstance(parts, dict) or sorted(parts) != ["test", "train", "val"]:
            raise DataError(f"{sf}: expected {{'train': [...], 'val': [...], 'test': [...]}}.")
        unknown = sorted({c for v in parts.values() for c in v} - set(metas))
        if unknown:
            raise DataError(f"{sf}: cases {unknown[:5]} are not in {root}.")
    else:
        parts = case_split(list(metas), tuple(fractions), seed)
    take = {k: [metas[c] for c in v] for k, v in parts.items()}
    return DataSplits(
        name="brats", task=Task("segmentation", 4, class_weights=CLASS_WEIGHTS, dice_ce_weight=1.0),
        train=BratsSlices(cache, take["train"], f"{root}[train]", slices_per_case, tumour_fraction, augment),
        val=BratsVolumes(cache, take["val"], f"{root}[val]"),
        test=BratsVolumes(cache, take["test"], f"{root}[test]"),
        description=f"BraTS 2021, {len(metas)} cases, 2D slices {sizes.pop()}",
        info={"cache": str(cache), "crop": crop, "split": parts, "seed": seed, "sequences": SEQUENCES,
              "sizes": {k: len(v) for k, v in parts.items()}})
