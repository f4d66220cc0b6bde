"""UPMC-Food-101 (image + recipe text, 101 classes) through features of a frozen ViT and BERT.

Raw layout (``path``; the layout of the public Kaggle copy of UPMC-Food-101)::

    path/images/train/<class>/<image id>      e.g. images/train/apple_pie/apple_pie_0.jpg
    path/images/test/<class>/<image id>       (images/<class>/<image id> is accepted as well)
    path/texts/train_titles.csv               rows: image id, text, class name (a header row is optional)
    path/texts/test_titles.csv                (path/train.csv and path/test.csv are accepted as well)

As in the paper, the image and the text are encoded by frozen pre-trained models (ViT for images,
BERT for text). The models are loaded from LOCAL folders the user gives (``vit``, ``bert``; e.g.
``google/vit-base-patch16-224`` and ``bert-base-uncased`` saved with ``save_pretrained``), with
``local_files_only=True``: nothing is downloaded. When ``vit``/``bert`` are not given, the folders
``path/models/vit`` and ``path/models/bert`` are used if they exist. This needs the ``features`` extra
(``transformers``). Features are extracted once and cached on disk:

* image: RGB, resized to the ViT's ``image_size`` (bilinear), scaled to [0, 1] and normalised
  with the mean/std of the folder's ``preprocessor_config.json`` (0.5/0.5 per channel, the ViT
  default, when it has none). The tokens kept are the CLS token followed by the patch tokens
  average-pooled to an ``image_grid`` x ``image_grid`` grid (default 7: 50 tokens; ``None`` keeps
  every patch token, 197 for ViT-B/16 at 224).
* text: at most ``text_len`` (default 50, as in the CGGM code) BERT tokens of the last hidden
  layer, with the tokenizer's attention mask as the padding mask.

Cache format (a folder; the folder given as ``features`` or as ``path`` is read directly, without
images or ``transformers``, when it holds ``meta.json``)::

    meta.json                 {"format": "cggm-food101-features", "classes": [...101 names...], ...}
    {train,test}_image.npy    float16/float32 (N, T_img, D_img)
    {train,test}_text.npy     float16/float32 (N, T_txt, D_txt)
    {train,test}_text_mask.npy   bool (N, T_txt), True on real tokens
    {train,test}_labels.npy   int (N,), indices into "classes"

The cache is read through memory maps, so it need not fit in RAM. By default it is written to
``path/cggm_features/<hash of the settings>_<hash of the sources>/`` (``cache_dir`` to change); the
sources are the name, size and modification time of the text lists, the images and the model
folders' files, so changed data or models extract again. It is built like the audio-visual cache
(:func:`cggm.data.paper._common.build_atomically`): in a folder of its own renamed into place,
once when several processes need it, with its disk space reserved after the first batch.

Validation is carved from the TRAINING set (never from test): a class-stratified
``val_fraction`` (default 10 %) of the training rows, drawn with ``seed`` (default 0).
Test is the published test list and is used only for the final evaluation.

Not done: the paper's image augmentation (random crop, flip, colour jitter) cannot be applied to
cached features of a frozen backbone; the official code does not apply it either.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..._optional import require
from ...types import Task
from ..base import DataError, DataSplits, stratified_split
from ..registry import register_dataset
from ._common import (
    build_atomically,
    check_class_labels,
    check_finite,
    existing_dir,
    files_signature,
    open_cached_array,
    reserve_arrays,
    settings_hash,
    sorted_rows,
)

FORMAT = "cggm-food101-features"
MODALITIES = ("image", "text")
HEADER_WORDS = {"label", "labels", "class", "category", "food"}


# -- the cached-feature dataset -------------------------------------------------------------------
class FeatureDataset:
    """Rows ``index`` of memory-mapped feature arrays; batches are float32 tensors."""

    def __init__(self, arrays: dict[str, np.ndarray], masks: dict[str, np.ndarray], labels: np.ndarray,
                 index: np.ndarray, source: str):
        self.arrays, self.masks, self.labels = arrays, masks, labels
        self.index = np.asarray(index, dtype=np.int64)
        self.source = source

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.arrays)

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {m: tuple(x.shape[1:]) for m, x in self.arrays.items()}

    def __len__(self) -> int:
        return len(self.index)

    def check_task(self, task: Task) -> None:
        check_class_labels(self.labels[self.index], task.num_outputs, self.source, "samples")

    def get_batch(self, idx) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        rows = self.index[np.asarray(idx, dtype=np.int64).reshape(-1)]
        ordered, inv = sorted_rows(rows)
        inputs = {m: torch.from_numpy(np.asarray(x[ordered], dtype=np.float32)[inv]) for m, x in self.arrays.items()}
        masks = {m: torch.from_numpy(np.asarray(x[ordered], dtype=bool)[inv]) for m, x in self.masks.items()}
        return inputs, masks, torch.from_numpy(np.asarray(self.labels[rows], dtype=np.int64))

    def __getitem__(self, i: int):
        inputs, masks, y = self.get_batch([i])
        return {m: v[0] for m, v in inputs.items()}, {m: v[0] for m, v in masks.items()}, y[0]


def read_cache(folder: str | Path, val_fraction: float = 0.1, seed: int = 0) -> DataSplits:
    """Food-101 splits from a feature cache (format in the module docstring)."""
    folder = existing_dir(folder, "Food-101 feature cache")
    meta_file = folder / "meta.json"
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError as err:
        raise DataError(f"{meta_file}: not found; a Food-101 feature cache needs meta.json.") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{meta_file}: not valid JSON: {err}") from err
    classes = meta.get("classes")
    if meta.get("format") != FORMAT or not isinstance(classes, list) or len(classes) < 2:
        raise DataError(f"{meta_file}: expected format {FORMAT!r} and a list of class names under 'classes'.")
    parts = {}
    for split in ("train", "test"):
        arrays = {m: _open(folder / f"{split}_{m}.npy", 3) for m in MODALITIES}
        mask = _open(folder / f"{split}_text_mask.npy", 2)
        labels = _open(folder / f"{split}_labels.npy", 1)
        n = len(labels)
        for name, x in (("image", arrays["image"]), ("text", arrays["text"]), ("text_mask", mask)):
            if x.shape[0] != n:
                raise DataError(f"{folder / f'{split}_{name}.npy'}: {x.shape[0]} rows but {split}_labels.npy has {n}.")
        if mask.shape[1] != arrays["text"].shape[1]:
            raise DataError(f"{folder / f'{split}_text_mask.npy'}: {mask.shape[1]} tokens but the text has "
                            f"{arrays['text'].shape[1]}.")
        if mask.dtype != bool:
            raise DataError(f"{folder / f'{split}_text_mask.npy'}: expected a bool mask, got {mask.dtype}.")
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{folder / f'{split}_labels.npy'}: expected integer class ids, got {labels.dtype}.")
        if n and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataError(f"{folder / f'{split}_labels.npy'}: labels range over [{labels.min()}, {labels.max()}] "
                            f"but meta.json lists {len(classes)} classes.")
        for m, x in arrays.items():
            _check_finite_chunked(x, folder / f"{split}_{m}.npy")
        if n and (~mask.any(axis=1)).any():
            row = int(np.flatnonzero(~mask.any(axis=1))[0])
            raise DataError(f"{folder / f'{split}_text_mask.npy'}: row {row} has no real token.")
        parts[split] = (arrays, {"text": mask}, labels)
    tr_arrays, tr_masks, tr_labels = parts["train"]
    if parts["test"][0]["image"].shape[1:] != tr_arrays["image"].shape[1:] or \
            parts["test"][0]["text"].shape[1:] != tr_arrays["text"].shape[1:]:
        raise DataError(f"{folder}: train and test features have different shapes.")
    train_idx, val_idx = stratified_split(np.asarray(tr_labels), (1 - val_fraction, val_fraction), seed)
    if len(val_idx) == 0:
        raise DataError(f"{folder}: val_fraction={val_fraction} leaves no validation rows.")
    te_arrays, te_masks, te_labels = parts["test"]
    return DataSplits(
        name="food101", task=Task("classification", len(classes)),
        train=FeatureDataset(tr_arrays, tr_masks, tr_labels, train_idx, f"{folder}[train]"),
        val=FeatureDataset(tr_arrays, tr_masks, tr_labels, val_idx, f"{folder}[val, from train]"),
        test=FeatureDataset(te_arrays, te_masks, te_labels, np.arange(len(te_labels)), f"{folder}[test]"),
        description=f"UPMC-Food-101 features from {folder}",
        info={"cache": str(folder), "classes": classes, "val_fraction": val_fraction, "seed": seed,
              "settings": meta.get("settings", {}),
              "sizes": {"train": len(train_idx), "val": len(val_idx), "test": len(te_labels)}})


def _open(file: Path, ndim: int) -> np.ndarray:
    return open_cached_array(file, ndim, "the Food-101 feature cache")


def _check_finite_chunked(x: np.ndarray, where: Path, chunk: int = 4096) -> None:
    for start in range(0, x.shape[0], chunk):
        check_finite(np.asarray(x[start:start + chunk]), f"{where} (rows {start}..)")


# -- raw data and extraction ----------------------------------------------------------------------
def _csv_file(root: Path, split: str) -> Path:
    for candidate in (root / "texts" / f"{split}_titles.csv", root / f"{split}.csv"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{root / 'texts' / f'{split}_titles.csv'}: not found (nor {root / f'{split}.csv'}); "
                    f"the Food-101 {split} text list is missing.")


def read_rows(file: Path) -> list[tuple[str, str, str]]:
    rows = []
    with open(file, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f)):
            if not row or all(not c.strip() for c in row):
                continue
            if n == 0 and row[-1].strip().lower() in HEADER_WORDS:
                continue
            if len(row) < 3:
                raise DataError(f"{file}: line {n + 1} has {len(row)} fields; expected image id, text, class name.")
            image_id, label = row[0].strip(), row[-1].strip()
            text = ",".join(row[1:-1])
            if not image_id or not label:
                raise DataError(f"{file}: line {n + 1} has an empty image id or class name.")
            rows.append((image_id, text, label))
    if not rows:
        raise DataError(f"{file}: no rows.")
    return rows


def _image_file(root: Path, split: str, image_id: str, label: str) -> Path:
    for candidate in (root / "images" / split / label / image_id, root / "images" / label / image_id,
                      root / "images" / split / image_id):
        if candidate.is_file():
            return candidate
    raise DataError(f"{root / 'images' / split / label / image_id}: image not found.")


def extract_features(path: str | Path, vit: str | Path, bert: str | Path, out_dir: str | Path,
                     image_grid: int | None = 7, text_len: int = 50, batch_size: int = 64,
                     device: str = "cpu", dtype: str = "float16", log=print) -> Path:
    """Encode the raw Food-101 data with the frozen local ViT and BERT into a cache at ``out_dir``
    (kept if ``out_dir`` already holds a complete cache, e.g. built meanwhile by another process)."""
    transformers = require("transformers", "features", "Food-101 feature extraction")
    image_mod = require("PIL.Image", "features", "Food-101 feature extraction")
    root = existing_dir(path, "UPMC-Food-101 folder")
    vit_dir, bert_dir = existing_dir(vit, "local ViT model folder"), existing_dir(bert, "local BERT model folder")
    rows, classes, files = _raw_lists(root)
    encoders = _Encoders.load(transformers, image_mod, vit_dir, bert_dir, image_grid, text_len, device)
    store = np.float16 if dtype == "float16" else np.float32

    out = Path(out_dir)
    index = {c: k for k, c in enumerate(classes)}
    need = [0]

    def extract(tmp: Path) -> None:
        arrays: dict[Path, np.memmap] = {}
        for split in ("train", "test"):
            labels = np.asarray([index[lab] for _, _, lab in rows[split]], dtype=np.int64)
            np.save(tmp / f"{split}_labels.npy", labels)
            _encode_split(encoders, split, rows, files, batch_size, store, out, tmp, arrays, need, log)
            for name in ("image", "text", "text_mask"):
                arrays.pop(tmp / f"{split}_{name}.npy").flush()
        meta = {"format": FORMAT, "classes": classes,
                "settings": {"vit": str(vit_dir), "bert": str(bert_dir), "image_grid": image_grid,
                             "text_len": text_len, "image_size": encoders.size, "mean": encoders.mean.tolist(),
                             "std": encoders.std.tolist(), "dtype": dtype}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    build_atomically(out, extract, "meta.json", log, need=lambda: need[0])
    return out


def _raw_lists(root: Path) -> tuple[dict[str, list[tuple[str, str, str]]], list[str], dict[str, list[Path]]]:
    """``(rows, classes, files)``: the train and test rows (image id, text, class name), the sorted
    training classes (a test class outside them is refused) and each row's image file."""
    rows = {split: read_rows(_csv_file(root, split)) for split in ("train", "test")}
    classes = sorted({label for _, _, label in rows["train"]})
    unknown = sorted({label for _, _, label in rows["test"]} - set(classes))
    if unknown:
        raise DataError(f"{_csv_file(root, 'test')}: classes {unknown[:5]} do not occur in the training list.")
    files = {split: [_image_file(root, split, i, lab) for i, _, lab in rows[split]] for split in rows}
    return rows, classes, files


@dataclass
class _Encoders:
    """The frozen local ViT and BERT (with BERT's tokenizer) and the image preprocessing."""

    vit: Any
    bert: Any
    tokenizer: Any
    image_mod: Any
    size: int
    mean: np.ndarray
    std: np.ndarray
    image_grid: int | None
    text_len: int
    device: str

    @classmethod
    def load(cls, transformers, image_mod, vit_dir: Path, bert_dir: Path, image_grid: int | None, text_len: int,
             device: str) -> _Encoders:
        try:
            vit_model = transformers.AutoModel.from_pretrained(str(vit_dir), local_files_only=True)
            bert_model = transformers.AutoModel.from_pretrained(str(bert_dir), local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(bert_dir), local_files_only=True)
        except OSError as err:
            raise DataError(f"cannot load the local ViT/BERT from {vit_dir} / {bert_dir}: {err}") from err
        vit_model.to(device).eval().requires_grad_(False)
        bert_model.to(device).eval().requires_grad_(False)
        size = int(getattr(vit_model.config, "image_size", 224))
        mean, std = _vit_stats(vit_dir)
        return cls(vit_model, bert_model, tokenizer, image_mod, size, mean, std, image_grid, text_len, device)

    def encode(self, files: list[Path], texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """A batch's image tokens, text tokens and text attention mask."""
        pixels = torch.stack([_load_image(self.image_mod, f, self.size, self.mean, self.std) for f in files])
        with torch.no_grad():
            img = _image_tokens(self.vit(pixel_values=pixels.to(self.device)).last_hidden_state, self.image_grid)
            enc = self.tokenizer(texts, max_length=self.text_len, truncation=True,
                                 padding="max_length", return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            txt = self.bert(**enc).last_hidden_state
        return img, txt, enc["attention_mask"]


def _encode_split(encoders: _Encoders, split: str, rows, files, batch_size: int, store, out: Path, tmp: Path,
                  arrays: dict[Path, np.memmap], need: list[int], log) -> None:
    """Encodes one split batch by batch into ``arrays`` (the cache's arrays in ``tmp``, reserved at
    the first batch of all, with the bytes they need in ``need[0]``)."""
    n = len(rows[split])
    for start in range(0, n, batch_size):
        chunk = range(start, min(n, start + batch_size))
        img, txt, attention = encoders.encode([files[split][i] for i in chunk], [rows[split][i][1] for i in chunk])
        if not arrays:  # the first batch gives every array's shape: reserve the whole cache's space
            plan = {}
            for sp in ("train", "test"):
                m = len(rows[sp])
                plan[tmp / f"{sp}_image.npy"] = (store, (m, *img.shape[1:]))
                plan[tmp / f"{sp}_text.npy"] = (store, (m, *txt.shape[1:]))
                plan[tmp / f"{sp}_text_mask.npy"] = (np.dtype(bool), (m, txt.shape[1]))
            need[0] = sum(int(np.dtype(d).itemsize * np.prod(sh, dtype=np.int64)) for d, sh in plan.values())
            arrays.update(reserve_arrays(out, plan))
        img_arr, txt_arr = arrays[tmp / f"{split}_image.npy"], arrays[tmp / f"{split}_text.npy"]
        mask_arr = arrays[tmp / f"{split}_text_mask.npy"]
        img_arr[chunk.start:chunk.stop] = img.float().cpu().numpy().astype(store)
        txt_arr[chunk.start:chunk.stop] = txt.float().cpu().numpy().astype(store)
        mask_arr[chunk.start:chunk.stop] = attention.bool().cpu().numpy()
        if log is not None and (start // batch_size) % 50 == 0:
            log(f"food101: encoded {chunk.stop}/{n} {split} samples")


def _sources(root: Path, vit: str, bert: str) -> list[Path]:
    """What a feature cache is extracted from: the text lists, every listed image, the models' files."""
    lists = {split: _csv_file(root, split) for split in ("train", "test")}
    images = [_image_file(root, split, i, lab) for split, f in lists.items() for i, _, lab in read_rows(f)]
    models = [f for d in (vit, bert) for f in sorted(Path(d).expanduser().rglob("*")) if f.is_file()]
    return [*lists.values(), *images, *models]


def _vit_stats(vit_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    cfg = vit_dir / "preprocessor_config.json"
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        mean, std = data.get("image_mean", mean), data.get("image_std", std)
    return np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)


def _load_image(image_mod, file: Path, size: int, mean: np.ndarray, std: np.ndarray) -> Tensor:
    try:
        with image_mod.open(file) as im:
            im = im.convert("RGB").resize((size, size), image_mod.BILINEAR)
            x = np.asarray(im, dtype=np.float32) / 255.0
    except Exception as err:
        raise DataError(f"{file}: cannot read the image: {err}") from err
    x = (x - mean) / std
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def _image_tokens(hidden: Tensor, grid: int | None) -> Tensor:
    """CLS token + patch tokens average-pooled to ``grid x grid`` (all patches when None)."""
    if grid is None:
        return hidden
    cls, patches = hidden[:, :1], hidden[:, 1:]
    side = round(patches.shape[1] ** 0.5)
    if side * side != patches.shape[1]:
        return hidden  # not a square grid (e.g. extra distillation tokens): keep everything
    fmap = patches.reshape(hidden.shape[0], side, side, -1).permute(0, 3, 1, 2)
    pooled = torch.nn.functional.adaptive_avg_pool2d(fmap, min(grid, side)).flatten(2).transpose(1, 2)
    return torch.cat([cls, pooled], dim=1)


@register_dataset("food101")
def load_food101(path: str, vit: str | None = None, bert: str | None = None, features: str | None = None,
                 cache_dir: str | None = None, image_grid: int | None = 7, text_len: int = 50,
                 val_fraction: float = 0.1, seed: int = 0, batch_size: int = 64, device: str = "cpu",
                 dtype: str = "float16") -> DataSplits:
    """UPMC-Food-101 (see the module docstring). Reads ``features`` (or ``path`` if it is a cache),
    else the cache for these settings, else extracts the features with the local ``vit``/``bert``."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}.")
    if features is not None:
        return read_cache(features, val_fraction, seed)
    root = existing_dir(path, "UPMC-Food-101 folder")
    if (root / "meta.json").is_file():
        return read_cache(root, val_fraction, seed)
    vit = vit if vit is not None else (str(root / "models" / "vit") if (root / "models" / "vit").is_dir() else None)
    bert = bert if bert is not None else (str(root / "models" / "bert") if (root / "models" / "bert").is_dir() else None)
    if vit is None or bert is None:
        raise DataError(f"{root}: raw Food-101 needs local model folders to extract features: pass "
                        f"dataset.options.vit=<ViT folder> and dataset.options.bert=<BERT folder> (or "
                        f"dataset.options.features=<feature cache>).")
    settings = {"vit": str(Path(vit).expanduser().resolve()), "bert": str(Path(bert).expanduser().resolve()),
                "image_grid": image_grid, "text_len": text_len, "dtype": dtype}
    folder = Path(cache_dir).expanduser() if cache_dir else root / "cggm_features"
    folder = folder / f"{settings_hash(settings)}_{files_signature(_sources(root, vit, bert))[:12]}"
    if not (folder / "meta.json").is_file():
        extract_features(root, vit, bert, folder, image_grid, text_len, batch_size, device, dtype)
    return read_cache(folder, val_fraction, seed)
