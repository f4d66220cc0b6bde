"""The Food-101 feature cache is built like the audio-visual one: named by its sources (changed
images extract again), and a full disk is an OSError naming the cache that leaves nothing behind."""

import errno
import os

import numpy as np
import pytest
from paper_fixtures import write_food101
from test_paper_food101 import _tiny_models

from cggm.data import load_dataset

pytest.importorskip("PIL")


def _load(root, vit, bert, **kw):
    return load_dataset("food101", path=str(root), vit=str(vit), bert=str(bert), image_grid=2, text_len=12,
                        val_fraction=0.2, batch_size=4, **kw)


def test_changed_images_extract_again(tmp_path):
    from PIL import Image

    vit, bert = _tiny_models(tmp_path)
    root = write_food101(tmp_path / "food")
    first = _load(root, vit, bert)
    image = sorted((root / "images" / "test" / "apple_pie").iterdir())[0]
    assert image.name == "apple_pie_test0.jpg"  # test row 0
    before = np.asarray(first.test.arrays["image"][0], dtype=np.float32)
    Image.new("RGB", (24, 20), (255, 255, 255)).save(image)  # another picture under the same name
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 5_000_000_000))
    second = _load(root, vit, bert)
    assert second.info["cache"] != first.info["cache"]
    after = np.asarray(second.test.arrays["image"][0], dtype=np.float32)
    assert np.abs(after - before).max() > 1e-3  # the new picture's features
    np.testing.assert_array_equal(np.asarray(second.test.arrays["text"]), np.asarray(first.test.arrays["text"]))


def test_full_disk_is_an_oserror_naming_the_feature_cache(tmp_path, monkeypatch):
    vit, bert = _tiny_models(tmp_path)
    root = write_food101(tmp_path / "food")  # 15 train and 6 test rows

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
    with pytest.raises(OSError) as err:
        _load(root, vit, bert, cache_dir=str(tmp_path / "cache"), dtype="float32")
    # image: CLS + 2 x 2 tokens of 16, text: 12 tokens of 12 (float32), mask: 12 bools; 6 arrays' headers
    need = 21 * (5 * 16 * 4 + 12 * 12 * 4 + 12) + 6 * 128
    assert err.value.errno == errno.ENOSPC and f"needs {need} bytes" in str(err.value)
    assert str(tmp_path / "cache") in str(err.value) and "dataset.options.cache_dir" in str(err.value)
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == []
