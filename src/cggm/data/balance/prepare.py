"""Extract frames (JPEG, 1 per second) and 16 kHz mono wav files from the benchmarks' videos with ffmpeg.

Only this helper needs ffmpeg (not the loaders, which read frames and wav files). Install it with
your system's package manager: ``apt-get install ffmpeg`` (Debian/Ubuntu), ``brew install ffmpeg``
(macOS), or ``conda install -c conda-forge ffmpeg``; or point ``CGGM_FFMPEG`` at the binary.

    python -m cggm.data.balance.prepare cremad          --root DIR   # DIR/VideoFlash/*.flv -> DIR/Image-01-FPS/<clip>/
    python -m cggm.data.balance.prepare ave             --root DIR   # DIR/AVE/*.mp4 -> DIR/visual/<id>/, DIR/audio/<id>.wav
    python -m cggm.data.balance.prepare kinetics_sounds --root DIR   # DIR/videos/**/*.mp4 -> DIR/visual/<clip>/, DIR/audio/<clip>.wav

Frames are written as ``frame_00001.jpg``, ``frame_00002.jpg``, ... (one per second of video, as
OGM-GE's preprocessing names them). A clip whose output already exists is skipped, so an
interrupted run can be restarted. ``--videos`` reads the videos from another folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..base import DataError

INSTALL = ("ffmpeg is needed to extract frames and audio from videos (only for this preprocessing step). "
           "Install it with `apt-get install ffmpeg` (Debian/Ubuntu), `brew install ffmpeg` (macOS) or "
           "`conda install -c conda-forge ffmpeg`, or set CGGM_FFMPEG to the ffmpeg binary.")
VIDEO_EXTS = (".mp4", ".flv", ".mkv", ".webm", ".avi", ".mov")
# dataset: (video folder, video pattern, frame folder, audio folder or None when the dataset ships wav files)
LAYOUTS = {
    "cremad": ("VideoFlash", "*.flv", "Image-01-FPS", None),
    "ave": ("AVE", "*.mp4", "visual", "audio"),
    "kinetics_sounds": ("videos", "**/*", "visual", "audio"),
}


def ffmpeg() -> str:
    exe = os.environ.get("CGGM_FFMPEG") or shutil.which("ffmpeg")
    if not exe:
        raise DataError(INSTALL)
    return exe


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DataError(f"ffmpeg failed on {what} (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")


def extract_frames(video: Path, out_dir: Path, fps: int = 1, exe: str | None = None) -> Path:
    """``out_dir/frame_00001.jpg ...``: ``fps`` frames per second of ``video`` (written to a
    temporary folder first, so a partial folder is never mistaken for a finished one)."""
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _run([exe or ffmpeg(), "-nostdin", "-loglevel", "error", "-y", "-i", str(video), "-vf", f"fps={fps}",
          "-q:v", "2", str(tmp / "frame_%05d.jpg")], str(video))
    if not any(tmp.iterdir()):
        raise DataError(f"{video}: ffmpeg wrote no frames.")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def extract_wav(video: Path, out_file: Path, sample_rate: int = 16000, exe: str | None = None) -> Path:
    """``out_file``: the video's audio as 16-bit PCM mono at ``sample_rate`` Hz."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.stem + ".partial.wav")
    _run([exe or ffmpeg(), "-nostdin", "-loglevel", "error", "-y", "-i", str(video), "-vn", "-ac", "1", "-ar",
          str(sample_rate), "-acodec", "pcm_s16le", str(tmp)], str(video))
    tmp.replace(out_file)
    return out_file


def prepare(dataset: str, root: str | Path, videos: str | Path | None = None, fps: int = 1, sample_rate: int = 16000,
            workers: int = 4, log=print) -> dict[str, int]:
    """Frames (and wav files, except for CREMA-D, which ships them) of every video of ``dataset``
    under ``root`` (layouts in the module docstring). Returns counts of done and skipped clips."""
    if dataset not in LAYOUTS:
        raise ValueError(f"Unknown dataset {dataset!r}; known: {sorted(LAYOUTS)}.")
    exe = ffmpeg()
    root = Path(root).expanduser()
    video_dir, pattern, frame_dir, audio_dir = LAYOUTS[dataset]
    src = Path(videos).expanduser() if videos else root / video_dir
    if not src.is_dir():
        raise DataError(f"{src}: the {dataset} video folder does not exist.")
    files = sorted(p for p in src.glob(pattern) if p.is_file() and p.suffix.lower() in VIDEO_EXTS)
    if not files:
        raise DataError(f"{src}: no videos ({pattern}, {'/'.join(VIDEO_EXTS)}) found.")

    def one(video: Path) -> bool:
        frames = root / frame_dir / video.stem
        wav = root / audio_dir / f"{video.stem}.wav" if audio_dir else None
        done = frames.is_dir() and (wav is None or wav.is_file())
        if done:
            return False
        if not frames.is_dir():
            extract_frames(video, frames, fps, exe)
        if wav is not None and not wav.is_file():
            extract_wav(video, wav, sample_rate, exe)
        return True

    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        results = list(pool.map(one, files))
    counts = {"videos": len(files), "extracted": sum(results), "skipped": len(files) - sum(results)}
    if log is not None:
        log(f"{dataset}: {counts['extracted']} videos extracted, {counts['skipped']} already done, into {root}")
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cggm.data.balance.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", choices=sorted(LAYOUTS))
    p.add_argument("--root", required=True, help="the dataset folder (the loader's --data-path)")
    p.add_argument("--videos", default=None, help="where the videos are, if not in the default folder under --root")
    p.add_argument("--fps", type=int, default=1, help="frames kept per second of video (default 1)")
    p.add_argument("--sample-rate", type=int, default=16000, help="wav sample rate in Hz (default 16000)")
    p.add_argument("--workers", type=int, default=4, help="ffmpeg processes at once (default 4)")
    args = p.parse_args(argv)
    try:
        prepare(args.dataset, args.root, args.videos, args.fps, args.sample_rate, args.workers)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
