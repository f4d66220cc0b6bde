"""Tiny copies of the audio-visual benchmarks in their real layouts: wav files written with
``wave``, JPEG frames written with Pillow, pickled / .npy spectrograms and the list files."""

from __future__ import annotations

import os
import pickle
import stat
import sys
import wave
from pathlib import Path

import numpy as np

CREMAD_CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
COLORS = [(220, 30, 30), (30, 200, 40), (40, 40, 210), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def write_wav(path: Path, seconds: float = 0.5, rate: int = 8000, freq: float = 440.0, channels: int = 1,
              width: int = 2, amplitude: float = 0.5) -> Path:
    n = int(seconds * rate)
    t = np.arange(n) / rate
    x = amplitude * np.sin(2 * np.pi * freq * t)
    data = np.repeat(x[:, None], channels, axis=1).reshape(-1)
    if width == 1:
        raw = np.clip(np.round(x.repeat(channels) * 128 + 128), 0, 255).astype(np.uint8).tobytes()
    elif width == 2:
        raw = np.round(data * 32767).astype("<i2").tobytes()
    elif width == 3:
        v = np.round(data * (2**23 - 1)).astype(np.int32)
        raw = np.stack([v & 255, (v >> 8) & 255, (v >> 16) & 255], axis=1).astype(np.uint8).tobytes()
    else:
        raw = np.round(data * (2**31 - 1)).astype("<i4").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    return path


def write_frames(folder: Path, n: int, color, size=(20, 16), names="frame_{:05d}.jpg", start: int = 1) -> list[Path]:
    """``n`` JPEG frames of one colour (brightness rising with the frame number), named ``names``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        pixels = np.empty((size[1], size[0], 3), dtype=np.uint8)
        pixels[:] = np.clip(np.asarray(color) * (0.6 + 0.1 * i), 0, 255).astype(np.uint8)
        f = folder / names.format(i + start)
        Image.fromarray(pixels).save(f, quality=95)
        out.append(f)
    return out


def cremad_clip(i: int, code: str) -> str:
    return f"{1001 + i}_DFA_{code}_XX"


def write_cremad(root: Path, classes=("ANG", "HAP"), per_class=(5, 2), frames=3, rate=8000, missing=True) -> dict:
    """CREMA-D as released and preprocessed by OGM-GE: AudioWAV/<clip>.wav, Image-01-FPS/<clip>/
    (frames named 00000.jpg, 00030.jpg, ... as OGM-GE's cv2 extractor writes them), train.csv and
    test.csv ("clip,EMO"). Class c's wav is a sine of 300 + 200 c Hz and its frames have colour c.
    With ``missing`` one listed training clip has no frames (the papers' code skips it)."""
    rows = {"train": [], "test": []}
    k = 0
    for split, n in zip(("train", "test"), per_class):
        for code in classes:
            c = CREMAD_CLASSES.index(code)
            for _ in range(n):
                clip = cremad_clip(k, code)
                k += 1
                write_wav(root / "AudioWAV" / f"{clip}.wav", 0.4 + 0.05 * (k % 3), rate, 300 + 200 * c)
                write_frames(root / "Image-01-FPS" / clip, frames, COLORS[c], names="{:05d}.jpg", start=0)
                rows[split].append((clip, code))
    if missing:
        clip = cremad_clip(k, classes[0])
        write_wav(root / "AudioWAV" / f"{clip}.wav")
        rows["train"].append((clip, classes[0]))
    for split, r in rows.items():
        (root / f"{split}.csv").write_text("".join(f"{c},{y}\n" for c, y in r), encoding="utf-8")
    return rows


def write_kinetics_sounds(root: Path, classes=(0, 7, 30), per_class=(4, 2), frames=4, spec_shape=(24, 16),
                          style="ogm") -> dict:
    """Kinetics-Sounds as OGM-GE / BalanceBenchmark lay it out: pre-computed spectrograms
    train_spec/<clip>.npy and test_spec/<clip>.npy ([T, F], values 0.1 * label), frames
    train-frames-1fps/train/<clip>/frame_0000N.jpg and val-frames-1fps/test/<clip>/...; lists
    my_train.txt / my_test.txt ("clip,10,label", style "ogm") or ks_train_overlap.txt /
    ks_test_overlap.txt ("clip 10 label", style "balancebenchmark")."""
    rows = {"train": [], "test": []}
    k = 0
    frame_dirs = {"train": "train-frames-1fps/train", "test": "val-frames-1fps/test"}
    for split, n in zip(("train", "test"), per_class):
        for c in classes:
            for _ in range(n):
                clip = f"-{k:03d}Xy_ab{c}_{k:06d}_{k + 10:06d}"
                k += 1
                (root / f"{split}_spec").mkdir(parents=True, exist_ok=True)
                np.save(root / f"{split}_spec" / f"{clip}.npy", np.full(spec_shape, 0.1 * c, dtype=np.float32))
                write_frames(root / frame_dirs[split] / clip, frames, COLORS[c % len(COLORS)])
                rows[split].append((clip, c))
    for split, r in rows.items():
        if style == "ogm":
            (root / f"my_{split}.txt").write_text("".join(f"{c},10,{y}\n" for c, y in r))
        else:
            (root / f"ks_{split}_overlap.txt").write_text("".join(f"{c} 10 {y}\n" for c, y in r))
    return rows


AVE_CLASSES = ("Church bell", "Dog", "Truck")


def write_ave(root: Path, per_class=(4, 1, 2), frames=5, spec_shape=(20, 30), style="ave") -> dict:
    """AVE_Dataset as PMR lays it out: trainSet.txt / valSet.txt / testSet.txt
    ("Category&VideoID&Quality&Start&End", a header line in trainSet.txt, one video listed twice
    with two classes), Audio-1004-SE/<id>.pkl (pickled [257, 1004]-style arrays, here
    ``spec_shape``, values = class index), Image-01-FPS-SE/<id>/NNNNN.jpg. Style "ogm": OGM-GE's
    my_train.txt / my_test.txt ("class,VideoID") and stat.txt, no validation list."""
    rows = {"train": [], "val": [], "test": []}
    k = 0
    for split, n in zip(("train", "val", "test"), per_class):
        for c, name in enumerate(AVE_CLASSES):
            for _ in range(n):
                vid = f"v{k:03d}aBcD{c}"
                k += 1
                (root / "Audio-1004-SE").mkdir(parents=True, exist_ok=True)
                with open(root / "Audio-1004-SE" / f"{vid}.pkl", "wb") as f:
                    pickle.dump(np.full(spec_shape, float(c), dtype=np.float64), f)
                write_frames(root / "Image-01-FPS-SE" / vid, frames, COLORS[c], names="{:05d}.jpg", start=k * 30)
                rows[split].append((vid, name))
    if style == "ave":
        dup = rows["train"][0][0]
        lines = {s: [f"{name}&{vid}&good&0&10\n" for vid, name in r] for s, r in rows.items()}
        lines["train"] = ["Category&VideoID&Quality&StartTime&EndTime\n"] + lines["train"] + [f"Dog&{dup}&good&2&5\n"]
        for split, fname in (("train", "trainSet.txt"), ("val", "valSet.txt"), ("test", "testSet.txt")):
            (root / fname).write_text("".join(lines[split]))
    else:
        train = rows["train"] + rows["val"]
        (root / "my_train.txt").write_text("".join(f"{name},{vid}\n" for vid, name in train))
        (root / "my_test.txt").write_text("".join(f"{name},{vid}\n" for vid, name in rows["test"]))
        (root / "stat.txt").write_text("".join(f"{n}\n" for n in AVE_CLASSES))
    return rows


# -- raw videos and a stand-in for ffmpeg ---------------------------------------------------------
FAKE_FFMPEG = r'''#!{python}
"""Stands in for ffmpeg in tests: writes 3 JPEG frames for "-vf fps=N ... pattern", or a 1 s wav."""
import math, sys, wave
from array import array
args = sys.argv[1:]
out = args[-1]
size = len(open(args[args.index("-i") + 1], "rb").read())
if "-vf" in args:
    from PIL import Image
    for i in range(3):
        Image.new("RGB", (16, 12), ((40 * i + size) % 255, 90, 30)).save(out % (i + 1))
else:
    rate = int(args[args.index("-ar") + 1])
    with wave.open(out, "wb") as w:
        w.setnchannels(1); w.setsampwidth(2); w.setframerate(rate)
        w.writeframes(array("h", (int(8000 * math.sin(0.05 * i)) for i in range(rate))).tobytes())
'''


def write_fake_ffmpeg(bin_dir: Path) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "ffmpeg"
    exe.write_text(FAKE_FFMPEG.replace("{python}", sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC | stat.S_IXGRP | stat.S_IXOTH)
    return exe


def env_with_fake_ffmpeg(bin_dir: Path) -> dict:
    write_fake_ffmpeg(bin_dir)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def write_raw_cremad(root: Path, classes=("ANG", "HAP"), per_class=(5, 2)) -> dict:
    """CREMA-D as released (AudioWAV/*.wav, VideoFlash/*.flv; here the .flv files are stand-ins)
    plus OGM-GE's lists: what `prepare cremad` starts from."""
    rows = write_cremad(root, classes, per_class, missing=False)
    import shutil

    shutil.rmtree(root / "Image-01-FPS")
    (root / "VideoFlash").mkdir(parents=True, exist_ok=True)
    for r in rows.values():
        for clip, _ in r:
            (root / "VideoFlash" / f"{clip}.flv").write_bytes(b"FLV stand-in " + clip.encode())
    return rows


def write_raw_videos(dataset: str, root: Path) -> Path:
    """What ``python -m cggm.data.balance.prepare <dataset>`` starts from (stand-in video files)."""
    if dataset == "cremad":
        write_raw_cremad(root)
        return root
    folder = root / ("AVE" if dataset == "ave" else "videos/train")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (folder / f"clip{i}XyZ.mp4").write_bytes(b"mp4 stand-in %d" % i)
    return root


# -- tiny runs of the presets ---------------------------------------------------------------------
TINY = ["model.options.width=4", "dataset.options.image_size=32"]


def write_for_preset(preset: str, root: Path) -> list[str]:
    """A tiny copy of the preset's dataset at ``root`` (8 training clips: two steps at batch size 4);
    returns the overrides that shrink the run (ResNet width, frame size, spectrogram size, frames)."""
    if preset == "cremad":
        write_cremad(root, classes=("ANG", "HAP"), per_class=(5, 2))
        return TINY + ["dataset.options.val_fraction=0.2",
                       "dataset.options.audio_options={num_samples: 4096, n_fft: 128, hop_length: 64}"]
    if preset == "kinetics_sounds":
        write_kinetics_sounds(root, classes=(3, 12), per_class=(5, 2), frames=4, spec_shape=(48, 32))
        return TINY + ["dataset.options.val_fraction=0.2", "dataset.options.frames=2"]
    if preset == "ave":
        write_ave(root, per_class=(3, 1, 1), frames=3, spec_shape=(40, 60))  # 9 listed, 1 dropped: 8 train clips
        return TINY + ["dataset.options.frames=2"]
    raise ValueError(f"no audio-visual fixture for preset {preset!r}")
