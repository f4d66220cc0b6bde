import pickle

import numpy as np
import pytest
import torch
from paper_fixtures import write_mosi

from cggm.data import DataError, load_dataset


def _batch(split, n=4):
    return split.get_batch(torch.arange(n))


def test_mosi_shapes_masks_labels(tmp_path):
    file = write_mosi(tmp_path)
    data = load_dataset("mosi", path=str(tmp_path))  # a folder holding mosi_data.pkl
    assert data.modalities == ("text", "audio", "vision")
    assert data.task.kind == "regression" and data.task.num_outputs == 1
    assert data.input_shapes == {"text": (50, 300), "audio": (50, 5), "vision": (50, 20)}
    assert [len(data.train), len(data.val), len(data.test)] == [12, 6, 6]
    _inputs, masks, target = _batch(data.train)
    assert target.shape == (4,) and target.dtype == torch.float32
    for i in range(4):  # sample i is padded at the front for i % 5 steps
        assert masks["text"][i].tolist() == [False] * (i % 5) + [True] * (50 - i % 5)
        assert torch.equal(masks["audio"][i], masks["text"][i])
    for split in (data.train, data.val, data.test):
        assert bool(torch.isfinite(split.inputs["audio"]).all())
        assert float(split.target.abs().max()) <= 3
    assert data.info["audio_neg_inf_replaced"] == {"train": 3, "val": 3, "test": 3}
    assert float(data.train.inputs["audio"][0, 10, 1]) == 0.0
    assert load_dataset("mosi", path=str(file)).input_shapes == data.input_shapes  # the file itself


def test_mosei_same_format(tmp_path):
    write_mosi(tmp_path, dims={"text": 300, "audio": 74, "vision": 35}, name="mosei_senti_data.pkl")
    data = load_dataset("mosei", path=str(tmp_path))
    assert data.input_shapes["audio"] == (50, 74) and data.name == "mosei"


def _rewrite(file, edit):
    with open(file, "rb") as f:
        raw = pickle.load(f)
    edit(raw)
    with open(file, "wb") as f:
        pickle.dump(raw, f)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("valid"), "missing split 'valid'"),
    (lambda r: r["train"].pop("vision"), "lacks ['vision']"),
    (lambda r: r["test"].__setitem__("audio", r["test"]["audio"][:, :, 0]), "3-d array"),
    (lambda r: r["train"]["vision"].__setitem__((2, 3, 4), np.nan), "NaN"),
    (lambda r: r["train"]["text"].__setitem__((2, 3, 4), np.inf), "inf"),
    (lambda r: r["valid"]["labels"].__setitem__((1, 0, 0), 4.5), "must lie in [-3, 3]"),
    (lambda r: r["valid"].__setitem__("labels", r["valid"]["labels"][:3]), "one label per sample"),
    (lambda r: r["test"].__setitem__("text", r["test"]["text"][:, :, :10]), "feature sizes"),
])
def test_mosi_errors_name_file_and_problem(tmp_path, edit, message):
    file = write_mosi(tmp_path)
    _rewrite(file, edit)
    with pytest.raises(DataError, match="mosi_data.pkl") as err:
        load_dataset("mosi", path=str(file))
    assert message in str(err.value)


def test_mosi_missing_file_and_unsafe_pickle(tmp_path):
    with pytest.raises(DataError, match="mosi_data.pkl"):
        load_dataset("mosi", path=str(tmp_path))
    with pytest.raises(DataError, match="not found"):
        load_dataset("mosi", path=str(tmp_path / "nope.pkl"))
    bad = tmp_path / "evil.pkl"
    with open(bad, "wb") as f:
        pickle.dump({"train": {"x": torch.nn.Linear(1, 1)}}, f)
    with pytest.raises(DataError, match="refusing to load"):
        load_dataset("mosi", path=str(bad))


def test_mosi_neg_inf_error_mode(tmp_path):
    file = write_mosi(tmp_path)
    with pytest.raises(DataError, match="audio"):
        load_dataset("mosi", path=str(file), neg_inf="error")
