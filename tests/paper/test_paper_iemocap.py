import numpy as np
import pytest
import torch

from cggm.data import DataError, load_dataset

h5py = pytest.importorskip("h5py")
from paper_fixtures import write_iemocap


def test_iemocap_shapes_masks_labels(tmp_path):
    root = write_iemocap(tmp_path)
    data = load_dataset("iemocap", path=str(root), fold=1)
    assert data.modalities == ("audio", "vision", "text")
    assert data.task.kind == "classification" and data.task.num_outputs == 4
    assert [len(data.train), len(data.val), len(data.test)] == [10, 4, 4]
    shapes = data.input_shapes
    assert shapes["audio"] == (350, 130) and shapes["vision"][1] == 342 and shapes["text"][1] == 1024
    assert data.info["shortened"]["audio"] == 1  # the 420-frame utterance, evenly subsampled to 350
    inputs, masks, target = data.train.get_batch(torch.arange(4))
    assert target.tolist() == [0, 1, 2, 3]
    with h5py.File(root / "V" / "denseface.h5", "r") as h5:
        names = [n.decode() for n in np.load(root / "target" / "1" / "trn_int2name.npy")[:, 0]]
        for i in range(4):
            n = h5[names[i]].shape[0]
            assert masks["vision"][i].tolist() == [True] * n + [False] * (shapes["vision"][0] - n)
            assert torch.allclose(inputs["vision"][i, :n], torch.from_numpy(h5[names[i]][()]))
            assert float(inputs["vision"][i, n:].abs().sum()) == 0
    with h5py.File(root / "A" / "comparE.h5", "r") as h5:  # "trn" normalisation with the fold's mean/std file
        raw = h5[names[1]][()]
        assert torch.allclose(inputs["audio"][1, : len(raw)], torch.from_numpy((raw - 1.0) / 3.0), atol=1e-5)
    for split in (data.train, data.val, data.test):
        assert int(split.target.min()) >= 0 and int(split.target.max()) <= 3
        assert all(bool(m.any(dim=1).all()) for m in split.masks.values())


def test_iemocap_folds_caps_and_norms(tmp_path):
    root = write_iemocap(tmp_path, mean_std=False)
    one = load_dataset("iemocap", path=str(root), fold=1)
    two = load_dataset("iemocap", path=str(root), fold=2, max_len={"audio": 100}, norm="utt")
    assert not torch.equal(one.test.inputs["text"][:, :3], two.test.inputs["text"][:, :3])
    assert two.input_shapes["audio"] == (100, 130) and two.info["shortened"]["audio"] > 1
    assert "computed from the 10 training utterances" in one.info["audio_stats"]
    with pytest.raises(ValueError, match="1..10"):
        load_dataset("iemocap", path=str(root), fold=11)
    with pytest.raises(DataError, match="fold 3"):
        load_dataset("iemocap", path=str(root), fold=3)  # no label files for that fold


def test_iemocap_errors_name_file_and_problem(tmp_path):
    root = write_iemocap(tmp_path)
    names = [n.decode() for n in np.load(root / "target" / "1" / "trn_int2name.npy")[:, 0]]
    with h5py.File(root / "L" / "bert_large.h5", "a") as h5:
        del h5[names[2]]
    with pytest.raises(DataError, match=r"bert_large.h5: no features for utterance"):
        load_dataset("iemocap", path=str(root))

    root = write_iemocap(tmp_path / "b")
    with h5py.File(root / "V" / "denseface.h5", "a") as h5:
        x = h5[names[0]][()]
        x[0, 0] = np.nan
        del h5[names[0]]
        h5[names[0]] = x
    with pytest.raises(DataError, match=r"denseface.h5: utterance .* NaN"):
        load_dataset("iemocap", path=str(root))

    root = write_iemocap(tmp_path / "c")
    with h5py.File(root / "A" / "comparE.h5", "a") as h5:
        del h5[names[3]]
        h5[names[3]] = np.zeros((10, 129), dtype=np.float32)
    with pytest.raises(DataError, match="129 features"):
        load_dataset("iemocap", path=str(root))

    root = write_iemocap(tmp_path / "d")
    np.save(root / "target" / "1" / "val_label.npy", np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(DataError, match=r"val_label.npy: label row 0 has no positive entry"):
        load_dataset("iemocap", path=str(root))
    np.save(root / "target" / "1" / "val_label.npy", np.array([0, 1, 5, 2]))
    with pytest.raises(DataError, match=r"val_label.npy: labels range over \[0, 5\]"):
        load_dataset("iemocap", path=str(root))
    np.save(root / "target" / "1" / "val_label.npy", np.eye(4, dtype=np.float32)[:3])
    with pytest.raises(DataError, match="3 labels but val_int2name.npy lists 4"):
        load_dataset("iemocap", path=str(root))

    (root / "L" / "bert_large.h5").unlink()
    with pytest.raises(DataError, match=r"bert_large.h5: IEMOCAP text features not found"):
        load_dataset("iemocap", path=str(root))
