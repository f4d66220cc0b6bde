"""The ffmpeg preprocessing helper, with a stand-in ffmpeg (the real one is not needed by the tests)."""

import pytest

pytest.importorskip("PIL")

from balance_fixtures import env_with_fake_ffmpeg, write_fake_ffmpeg, write_raw_cremad

from cggm.data import DataError, load_dataset
from cggm.data.balance import prepare


def test_prepare_cremad_then_load(tmp_path, monkeypatch):
    rows = write_raw_cremad(tmp_path / "CREMA-D")
    monkeypatch.setenv("CGGM_FFMPEG", str(write_fake_ffmpeg(tmp_path / "bin")))
    counts = prepare.prepare("cremad", tmp_path / "CREMA-D", log=None)
    assert counts == {"videos": 14, "extracted": 14, "skipped": 0}
    clip = rows["train"][0][0]
    assert sorted(p.name for p in (tmp_path / "CREMA-D" / "Image-01-FPS" / clip).iterdir()) == \
        ["frame_00001.jpg", "frame_00002.jpg", "frame_00003.jpg"]
    assert prepare.prepare("cremad", tmp_path / "CREMA-D", log=None)["skipped"] == 14  # restartable
    data = load_dataset("cremad", path=str(tmp_path / "CREMA-D"), image_size=8, val_fraction=0.2,
                        audio_options={"num_samples": 2048, "n_fft": 64, "hop_length": 64})
    assert (len(data.train), len(data.val), len(data.test)) == (8, 2, 4)


def test_prepare_ave_command_line_finds_ffmpeg_on_path(tmp_path, monkeypatch):
    (tmp_path / "AVE_Dataset" / "AVE").mkdir(parents=True)
    (tmp_path / "AVE_Dataset" / "AVE" / "RUhOCu3LNXM.mp4").write_bytes(b"mp4 stand-in")
    monkeypatch.delenv("CGGM_FFMPEG", raising=False)
    monkeypatch.setenv("PATH", env_with_fake_ffmpeg(tmp_path / "bin")["PATH"])
    assert prepare.main(["ave", "--root", str(tmp_path / "AVE_Dataset"), "--workers", "1"]) == 0
    assert (tmp_path / "AVE_Dataset" / "visual" / "RUhOCu3LNXM" / "frame_00003.jpg").is_file()
    assert (tmp_path / "AVE_Dataset" / "audio" / "RUhOCu3LNXM.wav").is_file()


def test_no_ffmpeg_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.delenv("CGGM_FFMPEG", raising=False)
    monkeypatch.setattr(prepare.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="apt-get install ffmpeg"):
        prepare.prepare("cremad", tmp_path)
    assert prepare.main(["cremad", "--root", str(tmp_path)]) == 1
