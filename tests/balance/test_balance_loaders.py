"""The audio-visual benchmark loaders (CREMA-D, Kinetics-Sounds, AVE) on tiny fixtures in the real
layouts: wav files, JPEG frame folders, pickled / .npy spectrograms and the papers' list files."""

import json
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")

from balance_fixtures import (
    AVE_CLASSES,
    COLORS,
    CREMAD_CLASSES,
    write_ave,
    write_cremad,
    write_frames,
    write_kinetics_sounds,
    write_wav,
)

from cggm.data import DataError, load_dataset
from cggm.data.balance import _av
from cggm.data.balance._av import IMAGENET_MEAN, IMAGENET_STD, make_spec, read_list, read_wav, resample, spectrogram

SMALL_AUDIO = {"num_samples": 4096, "n_fft": 128, "hop_length": 64}  # [65, 65] spectrograms


def _colour(visual: torch.Tensor) -> np.ndarray:
    """The mean RGB (0-255) of normalised frames [B, K, 3, S, S] -> [B, K, 3]."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((visual * std + mean) * 255).mean(dim=(-1, -2)).numpy()


def test_cremad_ogm_layout(tmp_path):
    rows = write_cremad(tmp_path, classes=("ANG", "HAP"), per_class=(5, 2))
    data = load_dataset("cremad", path=str(tmp_path), image_size=16, val_fraction=0.2)
    assert data.modalities == ("audio", "visual") and data.task.num_outputs == 6
    assert data.info["classes"] == list(CREMAD_CLASSES)
    # OGM-GE's recipe: 3 s at 22050 Hz, n_fft 512, hop 353 -> [1, 257, 188]; one frame of 16 x 16
    assert data.input_shapes == {"audio": (1, 257, 188), "visual": (1, 3, 16, 16)}
    # the listed clip without frames is skipped and counted, as the papers' code does
    assert data.info["missing"]["train"] == {"audio": 0, "frames": 1}
    # validation: a stratified 20 % of train, disjoint from it; test is test.csv
    assert (len(data.train), len(data.val), len(data.test)) == (8, 2, 4)
    assert set(data.train.index.tolist()).isdisjoint(data.val.index.tolist())
    assert data.val.audio is data.train.audio and data.test.audio is not data.train.audio
    assert sorted(data.val.labels[data.val.index].tolist()) == [1, 5]  # one HAP, one ANG
    train_clips = [c for c, _ in rows["train"][:-1]]
    assert data.train.clips == train_clips and data.test.clips == [c for c, _ in rows["test"]]
    inputs, masks, y = data.test.get_batch(torch.arange(4))
    assert masks == {} and y.tolist() == [5, 5, 1, 1]
    assert inputs["audio"].dtype == torch.float32 and inputs["visual"].shape == (4, 1, 3, 16, 16)
    # each clip's frame has its class colour (the middle one of 3 frames: brightness factor 0.7)
    colours = _colour(inputs["visual"])[:, 0]
    for got, label in zip(colours, y.tolist()):
        want = np.clip(np.asarray(COLORS[label]) * 0.7, 0, 255)
        assert np.abs(got - want).max() < 6, (got, want)
    # the spectrogram is the recipe's, computed from the wav file
    clip = data.test.clips[0]
    x, rate = read_wav(tmp_path / "AudioWAV" / f"{clip}.wav")
    expected = spectrogram(x, rate, make_spec("ogm_cremad"))
    assert np.allclose(inputs["audio"][0, 0].numpy(), expected, atol=2e-2)  # cached as float16


def test_cremad_cache_reused_and_augmentation_on_train_only(tmp_path):
    write_cremad(tmp_path, per_class=(5, 2))
    opts = dict(path=str(tmp_path), image_size=16, frames=2, val_fraction=0.2, audio_options=SMALL_AUDIO)
    data = load_dataset("cremad", **opts)
    meta = (tmp_path / "cggm_cache").glob("cremad_*/meta.json")
    meta = next(meta)
    stamp = meta.stat().st_mtime_ns
    again = load_dataset("cremad", **opts)
    assert meta.stat().st_mtime_ns == stamp and again.info["cache"] == data.info["cache"]
    assert data.input_shapes == {"audio": (1, 65, 65), "visual": (2, 3, 16, 16)}
    idx = torch.arange(len(data.val))
    assert torch.equal(data.val.get_batch(idx)[0]["visual"], data.val.get_batch(idx)[0]["visual"])
    torch.manual_seed(1)
    a = data.train.get_batch(torch.arange(4))[0]["visual"]
    b = data.train.get_batch(torch.arange(4))[0]["visual"]
    assert a.shape == b.shape == (4, 2, 3, 16, 16) and not torch.equal(a, b)
    # a different setting gets its own cache
    other = load_dataset("cremad", **{**opts, "frames": 1})
    assert other.info["cache"] != data.info["cache"]


def test_kinetics_sounds_ogm_and_balancebenchmark_lists(tmp_path):
    for style in ("ogm", "balancebenchmark"):
        root = tmp_path / style
        rows = write_kinetics_sounds(root, classes=(0, 7, 30), per_class=(4, 2), style=style)
        data = load_dataset("kinetics_sounds", path=str(root), image_size=16, val_fraction=0.25)
        assert data.task.num_outputs == 31 and data.info["classes"][30] == "30"
        # pre-computed spectrograms are used as stored; 3 of 4 frames picked evenly
        assert data.input_shapes == {"audio": (1, 24, 16), "visual": (3, 3, 16, 16)}
        assert (len(data.train), len(data.val), len(data.test)) == (9, 3, 6)
        inputs, _, y = data.test.get_batch(torch.arange(6))
        assert y.tolist() == [c for _, c in rows["test"]]
        assert torch.allclose(inputs["audio"][:, 0, 0, 0], 0.1 * y.float(), atol=1e-3)
        # frames 0, 2, 3 of 4 (the middle of 3 equal segments): brightness 0.6, 0.8, 0.9
        got = _colour(inputs["visual"])[0]
        for k, factor in enumerate((0.6, 0.8, 0.9)):
            assert np.abs(got[k] - np.clip(np.asarray(COLORS[y[0]]) * factor, 0, 255)).max() < 6
    with pytest.raises(DataError, match=r"range over \[0, 30\] but there are 20 classes"):
        load_dataset("kinetics_sounds", path=str(tmp_path / "ogm"), num_classes=20)


def test_ave_official_lists_and_ogm_lists(tmp_path):
    rows = write_ave(tmp_path / "ave", per_class=(4, 1, 2))
    data = load_dataset("ave", path=str(tmp_path / "ave"), image_size=16)
    assert data.info["classes"] == sorted(AVE_CLASSES) and data.task.num_outputs == 3
    assert data.input_shapes == {"audio": (1, 20, 30), "visual": (3, 3, 16, 16)}
    # the header line is skipped; the video listed twice with two classes is dropped (both lines)
    assert data.info["duplicates_dropped"]["train"] == 2
    assert rows["train"][0][0] not in data.train.clips
    # validation is AVE's valSet.txt, test its testSet.txt
    assert data.info["val_from"] == "list"
    assert (len(data.train), len(data.val), len(data.test)) == (11, 3, 6)
    assert data.val.clips == [v for v, _ in rows["val"]]
    inputs, _, y = data.test.get_batch(torch.arange(6))
    assert [AVE_CLASSES[int(a)] for a in inputs["audio"][:, 0, 0, 0]] == [data.info["classes"][i] for i in y]

    write_ave(tmp_path / "ogm", per_class=(4, 1, 2), style="ogm")
    ogm = load_dataset("ave", path=str(tmp_path / "ogm"), image_size=16, val_fraction=0.2)
    assert ogm.info["classes"] == list(AVE_CLASSES)  # stat.txt order
    assert ogm.info["val_from"].startswith("train") and (len(ogm.train), len(ogm.val), len(ogm.test)) == (12, 3, 6)


def test_list_formats(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("\ufeffCategory&VideoID&Quality&StartTime&EndTime\nChurch bell&RUhOCu3LNXM&good&0&10\n\n")
    assert [r[:2] for r in read_list(f, "label_clip")] == [("RUhOCu3LNXM", "Church bell")]
    f.write_text("1001_DFA_ANG_XX,ANG\n-4r6VLqGeK4_000106_000116,10,27\nabc 10 3\n")
    assert [r[:2] for r in read_list(f)] == [("1001_DFA_ANG_XX", "ANG"), ("-4r6VLqGeK4_000106_000116", "27"),
                                             ("abc", "3")]
    f.write_text("lonely\n")
    with pytest.raises(DataError, match="line 1"):
        read_list(f)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_read_wav_sample_widths_and_stereo(tmp_path, width):
    write_wav(tmp_path / "a.wav", seconds=0.1, rate=8000, freq=500, channels=2, width=width)
    x, rate = read_wav(tmp_path / "a.wav")
    t = np.arange(800) / 8000
    assert rate == 8000 and x.shape == (800,)
    assert np.abs(x - 0.5 * np.sin(2 * np.pi * 500 * t)).max() < (0.02 if width == 1 else 1e-3)


def test_resample_keeps_the_tone():
    rate = 8000
    x = np.sin(2 * np.pi * 440 * np.arange(rate) / rate).astype(np.float32)
    y = resample(x, rate, 22050)
    assert len(y) == 22050
    freqs = np.fft.rfftfreq(len(y), 1 / 22050)
    assert abs(freqs[np.abs(np.fft.rfft(y)).argmax()] - 440) < 1.5
    assert np.allclose(y[::2205][:4], np.sin(2 * np.pi * 440 * np.arange(0, 22050, 2205)[:4] / 22050), atol=1e-3)


def test_spectrogram_recipes_match_reference_implementations():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=3000) * 0.3).astype(np.float32)
    # ogm_cremad: centred STFT (reflect padding, periodic Hann), log magnitude; numpy reference
    spec = make_spec("ogm_cremad", {"sample_rate": 8000, "num_samples": 8000})
    got = spectrogram(x, 8000, spec)
    tiled = np.clip(np.tile(x, 3)[:8000], -1, 1).astype(np.float64)
    padded = np.pad(tiled, 256, mode="reflect")
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(512) / 512)
    frames = np.stack([padded[i:i + 512] * win for i in range(0, len(padded) - 511, 353)])
    ref = np.log(np.abs(np.fft.rfft(frames, axis=1)).T + 1e-7)
    assert got.shape == ref.shape == spec.shape and np.allclose(got, ref, atol=1e-4)
    # pmr_ave: scipy.signal.spectrogram(nperseg=512, noverlap=353), log, standardised per clip
    signal = pytest.importorskip("scipy.signal")
    spec = make_spec("pmr_ave", {"num_samples": 16000})
    got = spectrogram(x, 16000, spec)
    tiled = np.clip(np.tile(x, 6)[:16000], -1, 1)
    _, _, s = signal.spectrogram(tiled, 16000, nperseg=512, noverlap=353)
    ref = np.log(s + 1e-7)
    raw = spectrogram(x, 16000, make_spec("pmr_ave", {"num_samples": 16000, "normalize": "none"}))
    assert np.allclose(raw, ref, atol=1e-4)  # Tukey window, constant detrend, one-sided PSD scaling
    ref = (ref - ref.mean()) / (ref.std() + 1e-9)
    assert got.shape == ref.shape == spec.shape and np.allclose(got, ref, atol=1e-3)
    # log-mel: 128 bands
    assert spectrogram(x, 16000, make_spec("logmel_10s", {"num_samples": 16000})).shape == (128, 97)


def test_spectrogram_files_as_stored(tmp_path):
    arr = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    np.save(tmp_path / "a.npy", arr)
    with open(tmp_path / "b.pkl", "wb") as f:
        pickle.dump(arr[0].astype(np.float64), f)
    torch.save(torch.from_numpy(arr[0]), tmp_path / "c.pt")
    spec = make_spec("ogm_cremad")
    for name in ("a.npy", "b.pkl", "c.pt"):
        assert np.array_equal(_av.load_audio(tmp_path / name, spec), arr[0])
    np.save(tmp_path / "d.npy", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(DataError, match="2-d spectrogram"):
        _av.load_audio(tmp_path / "d.npy", spec)
    (tmp_path / "e.pkl").write_bytes(pickle.dumps(json.dumps))  # a function, not an array: refused
    with pytest.raises(DataError, match="e.pkl"):
        _av.load_audio(tmp_path / "e.pkl", spec)


def test_frame_order_and_picking(tmp_path):
    write_frames(tmp_path / "f", 3, COLORS[0], names="frame_{}.jpg", start=9)  # frame_9, frame_10, frame_11
    assert [p.name for p in _av.frame_files(tmp_path / "f")] == ["frame_9.jpg", "frame_10.jpg", "frame_11.jpg"]
    assert _av.pick(10, 3) == [1, 5, 8] and _av.pick(2, 3) == [0, 1, 1] and _av.pick(1, 2) == [0, 0]


def test_random_resized_crop_flip():
    x = torch.rand(5, 2, 3, 12, 12)
    torch.manual_seed(0)
    y = _av.random_resized_crop_flip(x)
    assert y.shape == x.shape and not torch.equal(x, y)
    # a crop of the whole image: the image or its mirror
    z = _av.random_resized_crop_flip(x, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for i in range(5):
        for t in range(2):
            assert torch.allclose(z[i, t], x[i, t], atol=1e-5) or torch.allclose(z[i, t], x[i, t].flip(-1), atol=1e-5)


def test_missing_data_says_where_to_get_it(tmp_path):
    with pytest.raises(DataError, match="--data-path") as err:
        load_dataset("cremad")
    assert "CheyneyComputerScience/CREMA-D" in str(err.value) and "Image-01-FPS/<clip>" in str(err.value)
    with pytest.raises(DataError, match="Kinetics-Sounds not found") as err:
        load_dataset("kinetics_sounds", path=str(tmp_path / "nowhere"))
    assert "Kinetics-400" in str(err.value) and "my_train.txt" in str(err.value)
    with pytest.raises(DataError, match="AVE not found") as err:
        load_dataset("ave", path=str(tmp_path / "nowhere"))
    assert "audiovisualresearch" in str(err.value) and "trainSet.txt" in str(err.value)
    (tmp_path / "c").mkdir()
    with pytest.raises(DataError, match=r"the train list \(train.csv\) is missing") as err:
        load_dataset("cremad", path=str(tmp_path / "c"))
    assert "OGM-GE_CVPR2022" in str(err.value)


def test_unusable_data_is_refused(tmp_path):
    write_cremad(tmp_path, per_class=(5, 2), missing=False)
    with open(tmp_path / "test.csv", "a") as f:
        f.write("1001_DFA_ANG_XX,ANG\n")  # a training clip in the test list
    with pytest.raises(DataError, match="also in the train list"):
        load_dataset("cremad", path=str(tmp_path))
    write_cremad(tmp_path, per_class=(5, 2), missing=True)
    with pytest.raises(DataError, match="has no frame folder"):
        load_dataset("cremad", path=str(tmp_path), strict=True)
    (tmp_path / "test.csv").write_text("1001_DFA_XXX_XX,XXX\n")
    with pytest.raises(DataError, match=r"labels \['XXX'\] are not among the 6 classes"):
        load_dataset("cremad", path=str(tmp_path))
    (tmp_path / "test.csv").write_text("nothing_here,ANG\n")
    with pytest.raises(DataError, match="none of the 1 clips"):
        load_dataset("cremad", path=str(tmp_path))


def test_cache_meta(tmp_path):
    write_ave(tmp_path, per_class=(2, 1, 1))
    data = load_dataset("ave", path=str(tmp_path), image_size=8, frames=1, cache_dir=str(tmp_path / "elsewhere"))
    meta = json.loads((tmp_path / "elsewhere" / data.info["cache"].split("/")[-1] / "meta.json").read_text())
    assert meta["format"] == "cggm-av-clips" and meta["classes"] == sorted(AVE_CLASSES)
