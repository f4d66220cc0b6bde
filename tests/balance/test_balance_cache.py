"""The audio-visual clip cache and the inputs it is built from: a changed clip builds a new cache,
two processes building the same cache at once both get it, a full disk is an OSError naming the
cache and leaves nothing behind, class names with spaces stay whole, and broken files are named."""

import errno
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")

from balance_fixtures import write_cremad, write_frames, write_kinetics_sounds

from cggm.data import DataError, load_dataset
from cggm.data.balance._av import read_wav

SMALL = {"num_samples": 4096, "n_fft": 128, "hop_length": 64}  # [65, 65] spectrograms


def _cremad(root, **kw):
    return load_dataset("cremad", path=str(root), image_size=16, val_fraction=0.2, audio_options=SMALL, **kw)


def _caches(base: Path) -> list[str]:
    return sorted(p.name for p in base.iterdir() if p.is_dir())


# -- (a) a changed clip builds a new cache ----------------------------------------------------------
def test_changed_clips_build_a_new_cache(tmp_path, capsys):
    rows = write_kinetics_sounds(tmp_path, classes=(0, 7), per_class=(3, 2), frames=2, spec_shape=(24, 16))
    data = load_dataset("kinetics_sounds", path=str(tmp_path), image_size=8, frames=1, val_fraction=0.34)
    clip = rows["train"][0][0]
    row = data.train.clips.index(clip)
    assert float(data.train.audio[row].max()) == 0.0  # class 0: its spectrogram is 0.1 * 0
    first = data.info["cache"]
    # the clip's spectrogram is rewritten: same size, new values (and a new modification time)
    spec = tmp_path / "train_spec" / f"{clip}.npy"
    np.save(spec, np.full((24, 16), 0.5, dtype=np.float32))
    st = spec.stat()
    os.utime(spec, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    capsys.readouterr()
    data = load_dataset("kinetics_sounds", path=str(tmp_path), image_size=8, frames=1, val_fraction=0.34)
    assert data.info["cache"] != first
    assert np.allclose(np.asarray(data.train.audio[row], dtype=np.float32), 0.5, atol=1e-3)
    assert f"changed since {first} was built" in capsys.readouterr().out  # and the old one is still there
    # a frame re-extracted with other pixels: again a new cache, with the new colour
    frame = sorted((tmp_path / "train-frames-1fps" / "train" / clip).iterdir())[0]
    write_frames(frame.parent, 2, (250, 250, 250))
    os.utime(frame, ns=(frame.stat().st_atime_ns, frame.stat().st_mtime_ns + 9_000_000_000))
    again = load_dataset("kinetics_sounds", path=str(tmp_path), image_size=8, frames=1, val_fraction=0.34)
    assert again.info["cache"] not in (first, data.info["cache"])
    assert int(np.asarray(again.train.visual[row]).min()) > 140  # bright now; class 0's frames were dark red
    # unchanged clips: the cache is reused
    assert load_dataset("kinetics_sounds", path=str(tmp_path), image_size=8, frames=1,
                        val_fraction=0.34).info["cache"] == again.info["cache"]
    assert len(_caches(tmp_path / "cggm_cache")) == 3


# -- (b) two processes build the same cache at once -------------------------------------------------
def _load_in_process(root: str, barrier, queue) -> None:
    torch.set_num_threads(1)
    barrier.wait()
    try:
        data = _cremad(root)
        queue.put(("ok", data.info["cache"], float(np.asarray(data.train.audio, dtype=np.float64).sum()),
                   int(np.asarray(data.train.visual, dtype=np.int64).sum()), data.train.clips))
    except BaseException as err:  # reported to the test, which fails with it
        queue.put(("error", f"{type(err).__name__}: {err}"))


def test_two_processes_building_the_same_cache_at_once(tmp_path):
    write_cremad(tmp_path, per_class=(8, 2), missing=False)
    # fork where there is one (the children start at once; each sets 1 torch thread before any torch op)
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_load_in_process, args=(str(tmp_path), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [r[0] for r in results] == ["ok", "ok"], results
    assert results[0][1:] == results[1][1:]  # the same cache, the same contents
    base = tmp_path / "cggm_cache"
    assert _caches(base) == [Path(results[0][1]).name]  # one complete cache, no partial folder left
    reference = _cremad(tmp_path)  # read again in this process: the cache is complete and reused
    assert reference.info["cache"] == results[0][1]
    assert float(np.asarray(reference.train.audio, dtype=np.float64).sum()) == results[0][2]


# -- (c) a full disk --------------------------------------------------------------------------------
def _cache_bytes(n_clips: int, spec=(65, 65), frames=1, size=16, arrays=4) -> int:
    """float16 spectrograms and uint8 frames of every clip, plus a 128-byte header per .npy array."""
    return n_clips * (1 * spec[0] * spec[1] * 2 + frames * 3 * size * size) + arrays * 128


def test_full_disk_is_an_oserror_naming_the_cache_and_leaves_nothing(tmp_path, monkeypatch):
    write_cremad(tmp_path / "data", per_class=(5, 2), missing=False)  # 10 + 4 clips
    cache_dir = tmp_path / "cache"

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
    with pytest.raises(OSError) as err:
        _cremad(tmp_path / "data", cache_dir=str(cache_dir))
    msg = str(err.value)
    assert err.value.errno == errno.ENOSPC
    assert f"{cache_dir}/cremad_" in msg and f"needs {_cache_bytes(14)} bytes" in msg
    assert "dataset.options.cache_dir" in msg and "Free space" in msg
    assert _caches(cache_dir) == []  # no half-written cache
    # the free space is checked before anything is written, too
    monkeypatch.undo()
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(OSError, match=rf"needs {_cache_bytes(14)} bytes .* and 1000 bytes"):
        _cremad(tmp_path / "data", cache_dir=str(cache_dir))
    assert _caches(cache_dir) == []
    monkeypatch.undo()
    assert len(_cremad(tmp_path / "data", cache_dir=str(cache_dir)).train) == 8  # with room, it builds


# -- (e) class names with spaces --------------------------------------------------------------------
NAMES = ("playing bass guitar", "playing electric guitar", "tapping guitar")


def _spaced_lists(root: Path, rows, names=NAMES):
    """BalanceBenchmark's whitespace-separated lists, with class names in place of the ids."""
    ids = sorted({y for r in rows.values() for _, y in r})
    name = dict(zip(ids, names))
    for split, r in rows.items():
        (root / f"my_{split}.txt").unlink()
        (root / f"ks_{split}_overlap.txt").write_text("".join(f"{c} 10 {name[y]}\n" for c, y in r))


def test_kinetics_sounds_class_names_with_spaces_are_kept_whole(tmp_path):
    rows = write_kinetics_sounds(tmp_path, classes=(0, 7, 30), per_class=(3, 2), frames=2)
    _spaced_lists(tmp_path, rows)
    data = load_dataset("kinetics_sounds", path=str(tmp_path), num_classes=None, image_size=8, frames=1,
                        val_fraction=0.34)
    assert data.info["classes"] == list(NAMES) and data.task.num_outputs == 3
    y = data.test.get_batch(torch.arange(len(data.test)))[2]
    assert y.tolist() == [0, 0, 1, 1, 2, 2]
    # a class list naming them with underscores matches them
    (tmp_path / "classes.txt").write_text("".join(f"{n.replace(' ', '_')}\n" for n in NAMES))
    data = load_dataset("kinetics_sounds", path=str(tmp_path), num_classes=3, image_size=8, frames=1,
                        val_fraction=0.34)
    assert data.info["classes"] == [n.replace(" ", "_") for n in NAMES]
    # two different source names that would be one class are refused
    text = (tmp_path / "ks_test_overlap.txt").read_text()
    (tmp_path / "ks_test_overlap.txt").write_text(text.replace("tapping guitar", "Tapping_Guitar", 1))
    with pytest.raises(DataError, match=r"'tapping guitar' and 'Tapping_Guitar' would both be class"):
        load_dataset("kinetics_sounds", path=str(tmp_path), num_classes=3, image_size=8, frames=1)
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(DataError, match=r"'Tapping_Guitar' and 'tapping guitar' are the same class"):
        load_dataset("kinetics_sounds", path=str(tmp_path), num_classes=None, image_size=8, frames=1)


# -- (f) broken files are named ---------------------------------------------------------------------
def test_a_wav_cut_mid_sample_is_named(tmp_path):
    rows = write_cremad(tmp_path, per_class=(5, 2), missing=False)
    wav = tmp_path / "AudioWAV" / f"{rows['train'][2][0]}.wav"
    wav.write_bytes(wav.read_bytes()[:-1])  # 16-bit samples: one byte short
    with pytest.raises(DataError, match="cut short") as err:
        read_wav(wav)
    assert str(wav) in str(err.value)
    with pytest.raises(DataError, match="ends mid-sample") as err:
        _cremad(tmp_path)
    assert str(wav) in str(err.value)
    assert _caches(tmp_path / "cggm_cache") == []  # the failed build left nothing


@pytest.mark.parametrize("inner", ["nested", "00000.jpg"])
def test_a_frame_folder_holding_only_a_folder_is_named(tmp_path, inner):
    rows = write_cremad(tmp_path, per_class=(5, 2), missing=False)
    folder = tmp_path / "Image-01-FPS" / rows["train"][1][0]
    shutil.rmtree(folder)
    write_frames(folder / inner, 3, (10, 200, 10))  # the frames one folder too deep
    with pytest.raises(DataError, match="holds no image file") as err:
        _cremad(tmp_path)
    assert str(folder) in str(err.value) and f"{inner}/" in str(err.value)


def test_without_locks_the_first_complete_copy_wins(tmp_path, monkeypatch):
    """Where the file system has no locks, concurrent builders each build a copy in a folder of their
    own; the one renamed first is the cache, the later one is dropped (here: another builder finishes
    while this one is building)."""
    from contextlib import contextmanager

    from cggm.data.paper import _common

    @contextmanager
    def no_lock(out, log=None):
        yield False

    monkeypatch.setattr(_common, "build_lock", no_lock)
    out = tmp_path / "cache"

    def write(tag):
        def build(tmp):
            (tmp / "data.txt").write_text(tag)
            if tag == "slow":  # meanwhile another process completes the same cache
                assert _common.build_atomically(out, write("fast")) is True
            (tmp / "meta.json").write_text("{}")
        return build

    assert _common.build_atomically(out, write("slow")) is False
    assert (out / "data.txt").read_text() == "fast"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # the slow copy was removed
