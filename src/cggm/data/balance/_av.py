"""Shared parts of the audio-visual benchmark loaders (CREMA-D, Kinetics-Sounds, AVE).

* audio: PCM wav files decoded with the standard library (``wave``), resampled by FFT and turned
  into a log spectrogram with ``torch.stft`` (:class:`SpectrogramSpec`); or a pre-computed
  spectrogram per clip (``.npy``, a pickled numpy array ``.pkl``, or a torch tensor ``.pt``),
  used as stored;
* frames: a folder of images per clip; ``frames`` of them are picked evenly (the middle of
  ``frames`` equal segments of the sorted file list), decoded with Pillow, converted to RGB and
  resized to ``image_size`` x ``image_size`` (bilinear, aspect ratio not kept, as the papers'
  evaluation transform ``Resize((224, 224))``);
* list files (one clip per line) in the formats the papers' code reads;
* a cache: every clip is decoded once into memory-mapped arrays (spectrograms as float16 or
  float32, frames as uint8), so training reads no JPEG or wav. Its folder name covers the settings
  and the source files (name, size and modification time of every listed wav / spectrogram and
  frame), so a changed clip builds a new cache. It is built in a folder of its own and renamed into
  place, under a lock (concurrent processes, e.g. torchrun ranks, build it once), with its disk
  space reserved first (a full disk is an OSError naming the cache, not a bus error);
* :class:`AVClips`, the split datasets over the cache. Training batches are augmented as the
  papers' training transform (``RandomResizedCrop(224)`` and a horizontal flip, each frame
  independently) on the cached frames, with torch's global generator (seeded and checkpointed by
  the engine); every batch is normalised with the ImageNet mean and std.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import wave
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from ..._optional import require
from ...types import Task
from ..base import DataError, DataSplits, stratified_split
from ..paper._common import (
    build_atomically,
    check_class_labels,
    check_finite,
    files_signature,
    load_pickle,
    open_cached_array,
    reserve_arrays,
    settings_hash,
    sorted_rows,
)

MODALITIES = ("audio", "visual")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
AUDIO_EXTS = (".npy", ".pkl", ".pt", ".wav")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_FORMAT = "cggm-av-clips"


# -- audio ----------------------------------------------------------------------------------------
def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the sample rate of a PCM wav file (channels averaged)."""
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError) as err:
        raise DataError(f"{path}: cannot read as a PCM wav file ({err}). Convert it to 16-bit PCM, e.g. "
                        f"ffmpeg -i IN -acodec pcm_s16le OUT.wav") from err
    if len(raw) % (width * channels):
        raise DataError(f"{path}: the wav file is cut short: its audio data ends mid-sample ({len(raw)} bytes, not a "
                        f"whole number of {width * channels}-byte frames of {channels} channel(s) x {width} bytes). "
                        f"Copy or extract it again (python -m cggm.data.balance.prepare re-extracts a deleted wav).")
    if width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = np.frombuffer(raw, dtype="<i4").astype(np.float32) / float(1 << 31)
    else:  # pragma: no cover - the wave module only reads 1..4-byte PCM
        raise DataError(f"{path}: unsupported sample width {width} bytes.")
    if channels > 1:
        x = x[: len(x) // channels * channels].reshape(-1, channels).mean(axis=1)
    if x.size == 0:
        raise DataError(f"{path}: the wav file has no samples.")
    return x, int(rate)


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling by zero-padding or truncating the spectrum (FFT method)."""
    if rate_in == rate_out:
        return x
    n_out = max(1, int(round(len(x) * rate_out / rate_in)))
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    spec = torch.fft.rfft(t)
    keep = min(spec.shape[0], n_out // 2 + 1)
    out = torch.zeros(n_out // 2 + 1, dtype=spec.dtype)
    out[:keep] = spec[:keep]
    if n_out < len(x) and n_out % 2 == 0:  # the new Nyquist bin of a real signal is real
        out[-1] = out[-1].real
    y = torch.fft.irfft(out, n=n_out) * (n_out / len(x))
    return y.numpy().astype(np.float32)


@dataclass(frozen=True)
class SpectrogramSpec:
    """How a waveform becomes a log spectrogram ``[freq, time]``.

    The waveform is resampled to ``sample_rate``, repeated (tiled) until it has ``num_samples``
    samples and cut there, and clipped to [-1, 1]. Frames of ``n_fft`` samples every
    ``hop_length`` are windowed (``hann`` or scipy's default ``tukey`` with alpha 0.25); with
    ``center`` the signal is padded by ``n_fft // 2`` on both sides (``pad_mode``); with
    ``detrend`` each frame's mean is removed first. The magnitude is raised to ``power`` (1:
    magnitude, 2: power), optionally scaled as a power spectral density (``density``, scipy's
    ``scaling="density"``), optionally projected on ``n_mels`` HTK mel bands, then
    ``log(S + log_eps)``; ``normalize="clip"`` standardises each spectrogram by its own mean and
    std.
    """

    sample_rate: int = 22050
    num_samples: int = 66150
    n_fft: int = 512
    hop_length: int = 353
    window: str = "hann"
    center: bool = True
    pad_mode: str = "reflect"
    detrend: bool = False
    power: float = 1.0
    density: bool = False
    n_mels: int | None = None
    log_eps: float = 1e-7
    normalize: str = "none"

    def __post_init__(self) -> None:
        checks = [
            (self.sample_rate > 0 and self.num_samples > 0, "sample_rate and num_samples must be > 0"),
            (0 < self.hop_length and 2 <= self.n_fft <= self.num_samples, "need 0 < hop_length and 2 <= n_fft <= num_samples"),
            (self.window in ("hann", "tukey"), f"window must be hann or tukey, got {self.window!r}"),
            (self.normalize in ("none", "clip"), f"normalize must be none or clip, got {self.normalize!r}"),
            (self.power in (1, 2, 1.0, 2.0), f"power must be 1 or 2, got {self.power!r}"),
            (self.n_mels is None or int(self.n_mels) >= 1, "n_mels must be None or >= 1"),
            (self.log_eps > 0, "log_eps must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"Invalid audio options: {msg}.")

    @property
    def shape(self) -> tuple[int, int]:
        frames = (1 + self.num_samples // self.hop_length if self.center
                  else 1 + (self.num_samples - self.n_fft) // self.hop_length)
        return (int(self.n_mels) if self.n_mels else self.n_fft // 2 + 1, frames)


RECIPES: dict[str, SpectrogramSpec] = {
    # OGM-GE's CREMA-D recipe: 3 s at 22050 Hz, STFT n_fft 512 / hop 353 (centred), log magnitude
    "ogm_cremad": SpectrogramSpec(),
    # PMR's AVE recipe: 10 s at 16 kHz, scipy.signal.spectrogram (nperseg 512, noverlap 353, Tukey
    # window, constant detrend, PSD), log, standardised per clip: [257, 1004]
    # a log-mel spectrogram of 10 s at 16 kHz (128 HTK mel bands, 32 ms windows every 10 ms): [128, 997]
    "logmel_10s": SpectrogramSpec(sample_rate=16000, num_samples=160000, n_fft=512, hop_length=160, center=False,
                                  power=2.0, n_mels=128, log_eps=1e-6),
    "pmr_ave": SpectrogramSpec(sample_rate=16000, num_samples=160000, n_fft=512, hop_length=159, window="tukey",
                               center=False, detrend=True, power=2.0, density=True, normalize="clip"),
}


def make_spec(recipe: str, options: Mapping | None = None) -> SpectrogramSpec:
    if recipe not in RECIPES:
        raise ValueError(f"Unknown audio recipe {recipe!r}; known: {sorted(RECIPES)}.")
    options = dict(options or {})
    known = {f.name for f in fields(SpectrogramSpec)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"Unknown audio options {unknown}; known: {sorted(known)}.")
    return replace(RECIPES[recipe], **options)


def _window(kind: str, n: int) -> Tensor:
    if kind == "hann":
        return torch.hann_window(n, periodic=True, dtype=torch.float64)
    # scipy.signal.get_window(("tukey", 0.25), n), periodic (fftbins=True): a symmetric n + 1 window, last dropped
    m, alpha = n + 1, 0.25
    k = torch.arange(m, dtype=torch.float64)
    w = torch.ones(m, dtype=torch.float64)
    edge = alpha * (m - 1) / 2.0
    left, right = k < edge, k > (m - 1) * (1 - alpha / 2.0)
    w[left] = 0.5 * (1 + torch.cos(math.pi * (2 * k[left] / (alpha * (m - 1)) - 1)))
    w[right] = 0.5 * (1 + torch.cos(math.pi * (2 * k[right] / (alpha * (m - 1)) - 2 / alpha + 1)))
    return w[:n]


def mel_filterbank(n_fft: int, sample_rate: int, n_mels: int) -> Tensor:
    """``[n_mels, n_fft // 2 + 1]`` triangular filters equally spaced on the HTK mel scale (0 Hz to Nyquist)."""
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    edges = hz(np.linspace(mel(0.0), mel(sample_rate / 2.0), n_mels + 2))
    bins = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (bins[None] - lower) / np.maximum(centre - lower, 1e-10)
    down = (upper - bins[None]) / np.maximum(upper - centre, 1e-10)
    return torch.from_numpy(np.maximum(0.0, np.minimum(up, down)))


def spectrogram(x: np.ndarray, rate: int, spec: SpectrogramSpec) -> np.ndarray:
    """The log spectrogram ``[freq, time]`` (float32) of mono samples ``x`` at ``rate`` Hz."""
    x = resample(np.asarray(x, dtype=np.float32), rate, spec.sample_rate)
    reps = -(-spec.num_samples // len(x))
    x = np.clip(np.tile(x, reps)[: spec.num_samples], -1.0, 1.0)
    t = torch.from_numpy(x.astype(np.float64))
    win = _window(spec.window, spec.n_fft)
    if spec.detrend:
        if spec.center:
            t = F.pad(t[None, None], (spec.n_fft // 2, spec.n_fft // 2), mode=spec.pad_mode)[0, 0]
        frames = t.unfold(0, spec.n_fft, spec.hop_length)
        frames = frames - frames.mean(dim=1, keepdim=True)
        stft = torch.fft.rfft(frames * win, dim=1).T  # [freq, time]
    else:
        stft = torch.stft(t, spec.n_fft, spec.hop_length, window=win, center=spec.center, pad_mode=spec.pad_mode,
                          return_complex=True)
    s = stft.abs() ** float(spec.power)
    if spec.density:
        s = s / (spec.sample_rate * float((win ** 2).sum()))
        s[1:-1 if spec.n_fft % 2 == 0 else None] *= 2.0  # one-sided: every bin but DC (and Nyquist) twice
    if spec.n_mels:
        s = mel_filterbank(spec.n_fft, spec.sample_rate, int(spec.n_mels)) @ s
    out = torch.log(s + spec.log_eps)
    if spec.normalize == "clip":
        out = (out - out.mean()) / (out.std(unbiased=False) + 1e-9)
    return out.numpy().astype(np.float32)


def load_audio(file: Path, spec: SpectrogramSpec) -> np.ndarray:
    """A clip's spectrogram ``[freq, time]``: computed from a wav file, or read as stored."""
    ext = file.suffix.lower()
    if ext == ".wav":
        x, rate = read_wav(file)
        return spectrogram(x, rate, spec)
    try:
        if ext == ".npy":
            arr = np.load(file, allow_pickle=False)
        elif ext == ".pkl":
            arr = load_pickle(file)
        elif ext == ".pt":
            arr = torch.load(file, map_location="cpu", weights_only=True)
            arr = arr.numpy() if isinstance(arr, Tensor) else arr
        else:
            raise DataError(f"{file}: unknown audio file type {ext!r}; expected one of {AUDIO_EXTS}.")
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{file}: cannot read the spectrogram: {err}") from err
    if not isinstance(arr, np.ndarray) or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"{file}: expected a numeric array, got {type(arr).__name__}.")
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise DataError(f"{file}: expected a 2-d spectrogram (a leading axis of size 1 is allowed), got shape "
                        f"{np.shape(arr)}.")
    arr = arr.astype(np.float32)
    check_finite(arr, str(file))
    return arr


# -- frames ---------------------------------------------------------------------------------------
def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def frame_files(folder: Path) -> list[Path]:
    """The image files of a clip's frame folder, in natural order (frame_2 before frame_10)."""
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file()),
                  key=lambda p: _natural_key(p.name))


def pick(n: int, k: int) -> list[int]:
    """``k`` indices into ``n`` frames: the middle of ``k`` equal segments (repeats when n < k)."""
    return [min(n - 1, int((i + 0.5) * n / k)) for i in range(k)]


def load_frames(files: Sequence[Path], size: int) -> np.ndarray:
    """uint8 ``[len(files), 3, size, size]``: RGB, resized bilinearly to ``size`` x ``size``."""
    image_mod = require("PIL.Image", "paper", "Reading video frames")
    out = np.empty((len(files), 3, size, size), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with image_mod.open(f) as im:
                im = im.convert("RGB").resize((size, size), image_mod.BILINEAR)
                out[i] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
        except Exception as err:
            raise DataError(f"{f}: cannot read the frame: {err}") from err
    return out


# -- list files -----------------------------------------------------------------------------------
def read_list(file: Path, order: str = "clip_label") -> list[tuple[str, str, list[str]]]:
    """``(clip, label, fields)`` per line of a list file.

    Fields are separated by ``&`` (AVE's lists), else by commas (OGM-GE's CSV lists), else by
    whitespace. ``order="clip_label"``: the clip is the first field and the label the last
    (``1001_DFA_ANG_XX,ANG``; ``clip,10,3``; ``clip label``); in a whitespace-separated line a class
    name may hold spaces (``clip 10 playing bass guitar``: the fields after the clip and its numeric
    fields). ``order="label_clip"``: the label is
    the first field and the clip the second (AVE: ``Church bell&RUhOCu3LNXM&good&0&10``). A header
    line (AVE's ``Category&VideoID&...``) and blank lines are skipped.
    """
    rows = []
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{file}: cannot read the list: {err}") from err
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        sep = "&" if "&" in line else "," if "," in line else None
        parts = [p.strip() for p in (line.split(sep) if sep else line.split())]
        if len(parts) < 2:
            raise DataError(f"{file}: line {n} ({line!r}) has {len(parts)} field; expected a clip and a label.")
        if order == "clip_label":
            clip, label = parts[0], parts[-1]
            if sep is None and not re.fullmatch(r"-?\d+", label):  # a class name may have spaces: keep it whole
                rest = parts[1:]
                while len(rest) > 1 and re.fullmatch(r"-?\d+", rest[0]):  # numeric fields before it (",10,")
                    rest = rest[1:]
                label = " ".join(rest)
        else:
            clip, label = parts[1], parts[0]
        if (clip.lower(), label.lower()) in {("videoid", "category"), ("clip", "label"), ("name", "label"),
                                             ("filename", "label")}:
            continue
        if not clip or not label:
            raise DataError(f"{file}: line {n} has an empty clip name or label.")
        rows.append((clip, label, parts))
    if not rows:
        raise DataError(f"{file}: the list has no clips.")
    return rows


def read_classes(file: Path) -> list[str]:
    """Class names, one per line (first comma-separated field): OGM-GE's ``stat.csv`` / ``stat.txt``."""
    names = [line.split(",")[0].strip() for line in file.read_text(encoding="utf-8-sig").splitlines()]
    names = [n for n in names if n]
    if len(set(names)) != len(names) or len(names) < 2:
        raise DataError(f"{file}: expected at least 2 distinct class names, one per line.")
    return names


def first_file(root: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        p = Path(name) if Path(name).is_absolute() else root / name
        if p.is_file():
            return p
    return None


# -- resolving clips to files ---------------------------------------------------------------------
@dataclass
class Clip:
    name: str
    label: int
    audio: Path
    frames: Path


def resolve(rows: Sequence[tuple[str, int]], audio_dirs: Sequence[Path], visual_dirs: Sequence[Path],
            where: str, strict: bool) -> tuple[list[Clip], dict[str, int]]:
    """The clips whose audio file and non-empty frame folder exist (the papers' code skips the
    others; ``strict`` makes a missing clip an error). A clip's audio is ``<dir>/<clip><ext>`` in
    the first audio folder holding one (``AUDIO_EXTS`` order), or ``<frames>/<clip>.wav``."""
    audio_dirs = [d for d in audio_dirs if d.is_dir()]
    visual_dirs = [d for d in visual_dirs if d.is_dir()]
    clips, missing = [], {"audio": 0, "frames": 0}
    for name, label in rows:
        frames = next((d / name for d in visual_dirs if (d / name).is_dir()), None)
        if frames is not None and not frame_files(frames):
            inside = sorted(p.name + ("/" if p.is_dir() else "") for p in frames.iterdir())
            if any(p.is_dir() for p in frames.iterdir()):
                raise DataError(f"{frames}: the frame folder of clip {name!r} holds no image file "
                                f"({'/'.join(IMAGE_EXTS)}) but {inside[:5]}; its frames must be directly in it "
                                f"(move them up from the inner folder, or re-extract them).")
            frames = None  # an empty folder: no frames for this clip
        audio = next((d / f"{name}{ext}" for d in audio_dirs for ext in AUDIO_EXTS if (d / f"{name}{ext}").is_file()),
                     None)
        if audio is None and frames is not None and (frames / f"{name}.wav").is_file():
            audio = frames / f"{name}.wav"
        if audio is None or frames is None:
            missing["audio" if audio is None else "frames"] += 1
            if strict:
                what = "audio file" if audio is None else "frame folder (with images)"
                places = audio_dirs if audio is None else visual_dirs
                raise DataError(f"{where}: clip {name!r} has no {what}; looked in {[str(p) for p in places]}.")
            continue
        clips.append(Clip(name, label, audio, frames))
    return clips, missing


# -- the cache ------------------------------------------------------------------------------------
def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def sources_signature(splits: Mapping[str, list[Clip]]) -> str:
    """A hash of the name, size and modification time of every clip's audio file and frame files: a
    clip replaced, re-extracted, added or cut changes it (the files are not read)."""
    return files_signature(f for clips in splits.values() for c in clips for f in (c.audio, *frame_files(c.frames)))


def build_cache(out: Path, splits: Mapping[str, list[Clip]], spec: SpectrogramSpec, frames: int, image_size: int,
                dtype: str, meta: dict, log: Callable[[str], None] | None = print) -> Path:
    """Decode every clip once into ``out``, safely under concurrency and a full disk
    (:func:`~cggm.data.paper._common.build_atomically`: a temporary folder of this process, renamed
    when complete; a process finding the cache being built waits for it). The arrays' disk space is
    reserved before any clip is decoded (:func:`~cggm.data.paper._common.reserve_arrays`)."""
    store = np.float16 if dtype == "float16" else np.float32
    need = [0]

    def decode(tmp: Path) -> None:
        first = next(c for clips in splits.values() for c in clips)
        first_audio = load_audio(first.audio, spec)
        shape = first_audio.shape
        plan = {}
        for split, clips in splits.items():
            plan[tmp / f"{split}_audio.npy"] = (store, (len(clips), 1, *shape))
            plan[tmp / f"{split}_visual.npy"] = (np.uint8, (len(clips), frames, 3, image_size, image_size))
        need[0] = sum(int(np.dtype(d).itemsize * np.prod(sh, dtype=np.int64)) for d, sh in plan.values())
        arrays = reserve_arrays(out, plan)
        for split, clips in splits.items():
            n = len(clips)
            audio, visual = arrays.pop(tmp / f"{split}_audio.npy"), arrays.pop(tmp / f"{split}_visual.npy")
            np.save(tmp / f"{split}_labels.npy", np.asarray([c.label for c in clips], dtype=np.int64))
            for i, clip in enumerate(clips):
                spec_arr = first_audio if clip is first else load_audio(clip.audio, spec)
                if dtype == "float16" and float(np.abs(spec_arr).max()) > 65504.0:
                    raise DataError(f"{clip.audio}: spectrogram values up to {np.abs(spec_arr).max():.3g} overflow "
                                    f"float16; use dataset.options.dtype=float32.")
                if spec_arr.shape != shape:
                    raise DataError(f"{clip.audio}: spectrogram shape {spec_arr.shape}, but {shape} for the first clip "
                                    f"({first.audio}); every clip's spectrogram needs the same shape.")
                files = frame_files(clip.frames)
                if not files:
                    raise DataError(f"{clip.frames}: the frame folder of clip {clip.name!r} holds no image file "
                                    f"({'/'.join(IMAGE_EXTS)}) any more; it changed while the cache was built.")
                audio[i, 0] = spec_arr.astype(store)
                visual[i] = load_frames([files[j] for j in pick(len(files), frames)], image_size)
                if log is not None and (i + 1) % 1000 == 0:
                    log(f"{meta['dataset']}: decoded {i + 1}/{n} {split} clips")
            for arr in (audio, visual):
                arr.flush()
            del audio, visual
            (tmp / f"{split}_clips.json").write_text(json.dumps([c.name for c in clips]))
        (tmp / "meta.json").write_text(json.dumps({**meta, "format": CACHE_FORMAT}, indent=1, default=str))

    build_atomically(out, decode, "meta.json", log, need=lambda: need[0])
    return out


class AVClips:
    """Rows ``index`` of a cached split. ``get_batch`` returns ``audio`` ``[B, 1, F, T]`` float32
    and ``visual`` ``[B, K, 3, S, S]`` float32 (ImageNet-normalised; augmented when ``augment``)."""

    def __init__(self, arrays: tuple[np.ndarray, np.ndarray, np.ndarray, list[str]], index: np.ndarray | None,
                 augment: bool, source: str):
        self.audio, self.visual, self.labels, self.clips = arrays
        self.index = np.arange(len(self.labels)) if index is None else np.asarray(index, dtype=np.int64)
        self.augment, self.source = bool(augment), source
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)

    @property
    def modalities(self) -> tuple[str, ...]:
        return MODALITIES

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"audio": tuple(self.audio.shape[1:]), "visual": tuple(self.visual.shape[1:])}

    def __len__(self) -> int:
        return len(self.index)

    def check_task(self, task: Task) -> None:
        check_class_labels(self.labels[self.index], task.num_outputs, self.source, "clips")

    def get_batch(self, idx) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        rows = self.index[np.asarray(idx, dtype=np.int64).reshape(-1)]
        ordered, inv = sorted_rows(rows)
        audio = torch.from_numpy(np.asarray(self.audio[ordered], dtype=np.float32)[inv])
        visual = torch.from_numpy(np.asarray(self.visual[ordered])[inv]).float().div_(255.0)
        if self.augment:
            visual = random_resized_crop_flip(visual)
        visual = (visual - self.mean) / self.std
        return {"audio": audio, "visual": visual}, {}, torch.from_numpy(np.asarray(self.labels[rows], dtype=np.int64))

    def __getitem__(self, i: int):
        inputs, masks, y = self.get_batch([i])
        return {m: v[0] for m, v in inputs.items()}, {}, y[0]


def random_resized_crop_flip(x: Tensor, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries: int = 10) -> Tensor:
    """torchvision's ``RandomResizedCrop`` (output size = input size) then ``RandomHorizontalFlip``
    on every image of ``x`` ``[..., 3, H, W]`` independently, batched with ``grid_sample``. Crop
    sizes are drawn as torchvision draws them (area fraction in ``scale``, log-uniform aspect
    ratio in ``ratio``, ``tries`` attempts, else the whole image)."""
    shape = x.shape
    imgs = x.reshape(-1, *shape[-3:])
    n, (h, w) = imgs.shape[0], shape[-2:]
    area = torch.empty(n, tries).uniform_(*scale)
    log_r = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    r = torch.exp(log_r)
    cw = torch.sqrt(area * r) * math.sqrt(h / w)  # crop width / image width
    ch = torch.sqrt(area / r) * math.sqrt(w / h)  # crop height / image height
    ok = (cw <= 1) & (ch <= 1)
    first = torch.where(ok.any(dim=1), ok.float().argmax(dim=1), torch.full((n,), -1))
    take = first.clamp_min(0)
    fw = torch.where(first >= 0, cw[torch.arange(n), take], torch.ones(n))
    fh = torch.where(first >= 0, ch[torch.arange(n), take], torch.ones(n))
    cx = (torch.rand(n) * (1 - fw) + fw / 2) * 2 - 1  # crop centre in [-1, 1]
    cy = (torch.rand(n) * (1 - fh) + fh / 2) * 2 - 1
    flip = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = fw * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = fh, cy
    grid = F.affine_grid(theta.to(imgs.dtype), list(imgs.shape), align_corners=False)
    out = F.grid_sample(imgs, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(shape)


def open_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """A cached split's memory-mapped audio, frames and labels, and its clip names."""
    audio = _open(folder / f"{split}_audio.npy", 4)
    visual = _open(folder / f"{split}_visual.npy", 5)
    labels = _open(folder / f"{split}_labels.npy", 1)
    clips = json.loads((folder / f"{split}_clips.json").read_text())
    if not (len(audio) == len(visual) == len(labels) == len(clips)):
        raise DataError(f"{folder}: the {split} arrays disagree on the number of clips; delete the cache folder.")
    return audio, visual, labels, clips


def _open(file: Path, ndim: int) -> np.ndarray:
    return open_cached_array(file, ndim, "the clip cache; delete the cache folder to rebuild it")


# -- roots and lists of a dataset ----------------------------------------------------------------
def data_root(path: str | None, title: str, where: str, layout: str) -> Path:
    """The dataset folder, or a DataError saying where to get the data and what layout is expected."""
    how = (f"{title} is not included with cggm. {where}\nExpected layout (dataset.options.path, or "
           f"--data-path):\n{layout.rstrip()}")
    if path is None:
        raise DataError(f"No data folder given for {title}: pass --data-path DIR (or dataset.options.path=DIR).\n{how}")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: {title} not found (the folder does not exist).\n{how}")
    return root


def need_list(root: Path, given: str | None, candidates: Sequence[str], what: str, where: str, layout: str) -> Path:
    found = first_file(root, [given] if given else candidates)
    if found is None:
        names = given or " or ".join(candidates)
        raise DataError(f"{root}: the {what} list ({names}) is missing. {where}\nExpected layout:\n{layout.rstrip()}")
    return found


def dirs(root: Path, given, split: str, candidates: Sequence[str]) -> list[Path]:
    """Folders to search for a split: ``given`` (a folder, or a mapping split -> folder), else the candidates."""
    if isinstance(given, Mapping):
        given = given.get(split)
    names = [given] if given else list(candidates)
    return [Path(n).expanduser() if Path(n).expanduser().is_absolute() else root / n for n in names]


# -- the loader -----------------------------------------------------------------------------------
@dataclass
class SplitSource:
    """Where one split's clips come from: its list file, and the folders to search."""

    list_file: Path
    order: str
    audio_dirs: list[Path]
    visual_dirs: list[Path]


def labels_to_ids(rows_by_split: Mapping[str, list[tuple[str, str, list[str]]]], classes: Sequence[str] | None,
                  num_classes: int | None, where: str) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """Map list labels to class ids: integer labels are ids; names index ``classes`` (or the sorted
    names of all lists). Returns ``(clip, id)`` rows per split and the class names."""
    labels = [lab for rows in rows_by_split.values() for _, lab, _ in rows]
    if all(re.fullmatch(r"-?\d+", lab) for lab in labels):
        ids = [int(lab) for lab in labels]
        k = num_classes if num_classes is not None else (len(classes) if classes else max(ids) + 1)
        if min(ids) < 0 or max(ids) >= k:
            raise DataError(f"{where}: integer labels range over [{min(ids)}, {max(ids)}] but there are {k} classes "
                            f"(set dataset.options.num_classes).")
        names = list(classes) if classes else [str(i) for i in range(k)]
        return {s: [(c, int(lab)) for c, lab, _ in rows] for s, rows in rows_by_split.items()}, names
    names = list(classes) if classes else sorted(set(labels))
    index: dict[str, int] = {}
    for i, c in enumerate(names):  # names match whatever their case, spaces or underscores
        if class_key(c) in index:
            raise DataError(f"{where}: the class names {names[index[class_key(c)]]!r} and {c!r} are the same class "
                            f"written two ways; list each class once.")
        index[class_key(c)] = i
    unknown = sorted({lab for lab in labels if class_key(lab) not in index})
    if unknown:
        raise DataError(f"{where}: labels {unknown[:5]} are not among the {len(names)} classes {names[:8]}.")
    if num_classes is not None and num_classes != len(names):
        raise DataError(f"{where}: num_classes={num_classes} but the class list has {len(names)} names.")
    spellings: dict[int, str] = {}
    for lab in labels:  # two distinct source names never merge into one class
        first = spellings.setdefault(index[class_key(lab)], lab)
        if first != lab:
            raise DataError(f"{where}: the labels {first!r} and {lab!r} would both be class "
                            f"{names[index[class_key(lab)]]!r}; use one spelling per class in the lists.")
    return {s: [(c, index[class_key(lab)]) for c, lab, _ in rows] for s, rows in rows_by_split.items()}, names


def class_key(name: str) -> str:
    """How a class name is matched: case, runs of spaces and underscores ignored."""
    return " ".join(name.replace("_", " ").split()).casefold()


def dedupe(rows: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], int]:
    """Drop clips listed twice: one copy is kept when the labels agree; a clip with two different
    labels is dropped entirely (as OGM-GE's AVE loader does). Returns the rows and the number dropped."""
    labels: dict[str, set[int]] = {}
    for c, y in rows:
        labels.setdefault(c, set()).add(y)
    seen, out = set(), []
    for c, y in rows:
        if c in seen or len(labels[c]) > 1:
            continue
        seen.add(c)
        out.append((c, y))
    return out, len(rows) - len(out)


def load_av(name: str, root: Path, sources: Mapping[str, SplitSource], *, classes: Sequence[str] | None,
            num_classes: int | None, spec: SpectrogramSpec, frames: int, image_size: int, val_fraction: float,
            seed: int, cache_dir: str | None, strict: bool, dtype: str, augment: bool, description: str,
            log: Callable[[str], None] | None = print) -> DataSplits:
    """Splits of an audio-visual clip dataset: ``sources`` has ``train`` and ``test`` (and
    optionally ``val``; otherwise validation is a class-stratified ``val_fraction`` of train,
    drawn with ``seed``)."""
    if int(frames) < 1 or int(image_size) < 8:
        raise ValueError(f"frames must be >= 1 and image_size >= 8, got {frames} and {image_size}.")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}.")
    if "val" not in sources and not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    frames, image_size = int(frames), int(image_size)
    rows, class_names, dropped = _labelled_rows(name, root, sources, classes, num_classes)
    clips, missing = {}, {}
    for s, src in sources.items():
        clips[s], missing[s] = resolve(rows[s], src.audio_dirs, src.visual_dirs, str(src.list_file), strict)
        if not clips[s]:
            raise DataError(
                f"{root}: none of the {len(rows[s])} clips of {src.list_file} has both its audio and its frames. "
                f"Looked for audio in {[str(d) for d in src.audio_dirs]} ({'/'.join(AUDIO_EXTS)}) and frame folders in "
                f"{[str(d) for d in src.visual_dirs]}.")
    folder = _decoded(name, root, sources, clips, class_names, spec=spec, frames=frames, image_size=image_size,
                      dtype=dtype, cache_dir=cache_dir, log=log)
    train, val, test = _av_splits(folder, root, sources, val_fraction, seed, augment)
    sizes = {"train": len(train), "val": len(val), "test": len(test)}
    return DataSplits(
        name=name, task=Task("classification", len(class_names)), train=train, val=val, test=test,
        description=f"{description} from {root}",
        info={"classes": class_names, "sizes": sizes, "missing": missing, "duplicates_dropped": dropped,
              "cache": str(folder), "val_from": "list" if "val" in sources else f"train, {val_fraction} stratified, "
              f"seed {seed}", "audio_shape": list(train.input_shapes["audio"]), "frames": frames,
              "image_size": image_size, "spec": asdict(spec)})


def _labelled_rows(name: str, root: Path, sources: Mapping[str, SplitSource], classes: Sequence[str] | None,
                   num_classes: int | None) -> tuple[dict[str, list[tuple[str, int]]], list[str], dict[str, int]]:
    """``(rows, class names, dropped)``: each split's (clip, class id) rows, duplicates dropped
    (how many per split), the splits refused unless disjoint."""
    raw = {s: read_list(src.list_file, src.order) for s, src in sources.items()}
    rows, class_names = labels_to_ids(raw, classes, num_classes, f"{root} ({name} lists)")
    dropped = {}
    for s in rows:
        rows[s], dropped[s] = dedupe(rows[s])
    for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
        if a in rows and b in rows:
            both = sorted({c for c, _ in rows[a]} & {c for c, _ in rows[b]})
            if both:
                raise DataError(f"{sources[b].list_file}: {len(both)} clips are also in the {a} list "
                                f"{sources[a].list_file} (e.g. {both[:3]}); the splits must be disjoint.")
    return rows, class_names, dropped


def _decoded(name: str, root: Path, sources: Mapping[str, SplitSource], clips: dict, class_names: list[str], *,
             spec: SpectrogramSpec, frames: int, image_size: int, dtype: str, cache_dir: str | None,
             log: Callable[[str], None] | None) -> Path:
    """The cache folder of these clips and settings, decoded into once (named by the settings and
    the clips' signature; an older cache of the same settings is named in the log, not deleted)."""
    settings = {"dataset": name, "spec": asdict(spec), "frames": frames, "image_size": image_size, "dtype": dtype,
                "lists": {s: [str(src.list_file.resolve()), file_digest(src.list_file)] for s, src in sources.items()},
                "clips": {s: [len(c), str(c[0].audio.parent.resolve()), str(c[0].frames.parent.resolve())]
                          for s, c in clips.items()}}
    signature = sources_signature(clips)  # a changed clip (audio or frames) names another cache
    base, prefix = Path(cache_dir).expanduser() if cache_dir else root / "cggm_cache", f"{name}_{settings_hash(settings)}"
    folder = base / f"{prefix}_{signature[:12]}"
    if not (folder / "meta.json").is_file():
        if log is not None:
            stale = sorted(str(p) for p in (base.iterdir() if base.is_dir() else [])
                           if p != folder and re.fullmatch(rf"{re.escape(prefix)}(_[0-9a-f]{{12}})?", p.name))
            log(f"{name}: decoding {sum(len(c) for c in clips.values())} clips into {folder} (once)"
                + (f"; the clips changed since {stale[-1]} was built: it is no longer used (delete it to free its "
                   f"space)" if stale else ""))
        build_cache(folder, clips, spec, frames, image_size, dtype,
                    {"dataset": name, "classes": class_names, "settings": settings, "sources": signature}, log)
    return folder


def _av_splits(folder: Path, root: Path, sources: Mapping[str, SplitSource], val_fraction: float, seed: int,
               augment: bool) -> tuple[AVClips, AVClips, AVClips]:
    """Train, validation (the ``val`` list's, else a stratified ``val_fraction`` of train drawn with
    ``seed``) and test clips over the decoded cache; only training clips are augmented."""
    arrays = {s: open_split(folder, s) for s in sources}
    tr_labels = np.asarray(arrays["train"][2])
    if "val" in sources:
        train_idx, val = np.arange(len(tr_labels)), AVClips(arrays["val"], None, False, f"{sources['val'].list_file}")
    else:
        train_idx, val_idx = stratified_split(tr_labels, (1 - val_fraction, val_fraction), seed)
        if len(val_idx) == 0 or len(train_idx) == 0:
            raise DataError(f"{root}: val_fraction={val_fraction} leaves {len(train_idx)} training and {len(val_idx)} "
                            f"validation clips; use a larger list or another val_fraction.")
        val = AVClips(arrays["train"], val_idx, False, f"{sources['train'].list_file}[val, carved from train]")
    train = AVClips(arrays["train"], train_idx, augment, f"{sources['train'].list_file}[train]")
    test = AVClips(arrays["test"], None, False, f"{sources['test'].list_file}[test]")
    return train, val, test
