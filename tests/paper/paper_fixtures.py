"""Small files in the exact formats of the paper's datasets, written into a temporary folder."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np

MOSI_DIMS = {"text": 300, "audio": 5, "vision": 20}


def write_mosi(root: Path, sizes=(12, 6, 6), seq=50, dims=MOSI_DIMS, name="mosi_data.pkl", seed=0) -> Path:
    """MulT's aligned pickle: train/valid/test with text/audio/vision (N, T, D) and labels (N, 1, 1).
    Sample i is zero-padded at the front for its first ``i % 5`` steps; audio has -inf values."""
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in zip(("train", "valid", "test"), sizes):
        part = {m: rng.normal(size=(n, seq, d)).astype(np.float32) for m, d in dims.items()}
        for i in range(n):
            for m in dims:
                part[m][i, : i % 5] = 0.0
        part["audio"][0, 10, 1] = -np.inf
        part["audio"][1, 20, :2] = -np.inf
        part["labels"] = rng.uniform(-3, 3, size=(n, 1, 1)).astype(np.float32)
        part["labels"][0, 0, 0] = 0.0
        part["id"] = np.array([[f"{split}_{i}", "0"] for i in range(n)])
        data[split] = part
    root.mkdir(parents=True, exist_ok=True)
    file = root / name
    with open(file, "wb") as f:
        pickle.dump(data, f)
    return file


IEMOCAP_DIMS = {"A": ("comparE", 130), "V": ("denseface", 342), "L": ("bert_large", 1024)}


def write_iemocap(root: Path, sizes=(10, 4, 4), folds=(1, 2), seed=0, long_audio=420, mean_std=True) -> Path:
    """MMIN layout: A/comparE.h5, V/denseface.h5, L/bert_large.h5 (one dataset per utterance),
    A/comparE_mean_std.h5 (group per fold), target/<fold>/{trn,val,tst}_{label,int2name}.npy."""
    import h5py

    rng = np.random.default_rng(seed)
    n_total = sum(sizes)
    names = [f"Ses0{1 + i % 5}F_impro0{i}_F00{i}" for i in range(n_total)]
    lengths = {"A": [20 + 7 * i for i in range(n_total)], "V": [5 + (i % 6) * 8 for i in range(n_total)],
               "L": [3 + (i % 7) * 3 for i in range(n_total)]}
    lengths["A"][0] = long_audio  # longer than the 350-frame cap
    for folder, (feat, dim) in IEMOCAP_DIMS.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        with h5py.File(root / folder / f"{feat}.h5", "w") as h5:
            for i, name in enumerate(names):
                h5[name] = (rng.normal(size=(lengths[folder][i], dim)) * (3 if folder == "A" else 1) + 1).astype(np.float32)
    if mean_std:
        with h5py.File(root / "A" / "comparE_mean_std.h5", "w") as h5:
            for fold in range(1, 11):
                g = h5.create_group(str(fold))
                g["mean"] = np.ones(130, dtype=np.float32)
                g["std"] = np.full(130, 3.0, dtype=np.float32)
    for fold in folds:
        order = np.roll(np.arange(n_total), fold - 1)
        start = 0
        for split, n in zip(("trn", "val", "tst"), sizes):
            idx = order[start:start + n]
            start += n
            d = root / "target" / str(fold)
            d.mkdir(parents=True, exist_ok=True)
            labels = np.zeros((n, 4), dtype=np.float32)
            labels[np.arange(n), np.arange(n) % 4] = 1
            np.save(d / f"{split}_label.npy", labels)
            np.save(d / f"{split}_int2name.npy", np.array([[names[i].encode()] for i in idx]))
    return root


FOOD_CLASSES = ("apple_pie", "bibimbap", "caesar_salad")


def write_food101(root: Path, per_class=(5, 2), size=20, seed=0) -> Path:
    """Kaggle UPMC-Food-101 layout: images/{train,test}/<class>/<id> (PNG and JPEG) and
    texts/{train,test}_titles.csv rows (id, text, class)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class):
        rows = []
        for c in FOOD_CLASSES:
            d = root / "images" / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                ext = "jpg" if i % 2 == 0 else "png"
                image_id = f"{c}_{split}{i}.{ext}"
                pixels = rng.integers(0, 255, size=(size, size + 4, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / image_id)
                rows.append((image_id, f"the best {c.replace('_', ' ')} recipe, number {i}", c))
        (root / "texts").mkdir(parents=True, exist_ok=True)
        with open(root / "texts" / f"{split}_titles.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    return root


def write_food_cache(folder: Path, n=(12, 6), tokens=(5, 7), dim=(16, 12), classes=4, seed=0) -> Path:
    """A Food-101 feature cache (format in cggm.data.paper.food101)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in zip(("train", "test"), n):
        np.save(folder / f"{split}_image.npy", rng.normal(size=(rows, tokens[0], dim[0])).astype(np.float16))
        np.save(folder / f"{split}_text.npy", rng.normal(size=(rows, tokens[1], dim[1])).astype(np.float16))
        mask = np.zeros((rows, tokens[1]), dtype=bool)
        for i in range(rows):
            mask[i, : 1 + i % tokens[1]] = True
        np.save(folder / f"{split}_text_mask.npy", mask)
        np.save(folder / f"{split}_labels.npy", np.arange(rows, dtype=np.int64) % classes)
    (folder / "meta.json").write_text(json.dumps({"format": "cggm-food101-features",
                                                   "classes": [f"class{i}" for i in range(classes)]}))
    return folder


def write_brats(root: Path, cases=4, shape=(24, 24, 8), seed=0) -> list[str]:
    """BraTS 2021 layout: <case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz. Each case has a tumour
    (labels 1, 2, 4) in slices 2..5 and one oedema voxel outside the centre 16 x 16 crop."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    names = []
    for c in range(cases):
        case = f"BraTS2021_{c:05d}"
        d = root / case
        d.mkdir(parents=True, exist_ok=True)
        H, W, D = shape
        brain = np.zeros(shape, dtype=bool)
        brain[3:H - 3, 3:W - 3, 1:D - 1] = True
        seg = np.zeros(shape, dtype=np.int16)
        seg[8:14, 8:14, 2:6] = 2
        seg[10:13, 10:13, 2:6] = 1
        if c % 2 == 0:
            seg[11:13, 11:13, 3:5] = 4
        seg[1, 1, 2] = 2  # outside the crop (and the brain mask, which is fine for a fixture)
        for name in ("flair", "t1", "t1ce", "t2"):
            vol = np.where(brain, rng.uniform(50, 500, size=shape), 0).astype(np.float32)
            nib.save(nib.Nifti1Image(vol, np.eye(4)), str(d / f"{case}_{name}.nii.gz"))
        nib.save(nib.Nifti1Image(seg, np.eye(4)), str(d / f"{case}_seg.nii.gz"))
        names.append(case)
    return names
