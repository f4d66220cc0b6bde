import json

import numpy as np
import pytest
import torch

from cggm.data import DataError, load_dataset
from cggm.methods import build_method
from cggm.training.evaluation import evaluate
from cggm.types import ModelOutput

nib = pytest.importorskip("nibabel")
from paper_fixtures import write_brats

OPTS = {"crop": 16, "fractions": (0.5, 0.25, 0.25), "seed": 0}


def test_brats_slices_labels_and_split(tmp_path):
    names = write_brats(tmp_path)
    data = load_dataset("brats", path=str(tmp_path), slices_per_case=3, **OPTS)
    assert data.modalities == ("flair", "t1", "t1ce", "t2")
    assert data.task.kind == "segmentation" and data.task.num_outputs == 4
    assert data.input_shapes == {m: (1, 16, 16) for m in data.modalities}
    parts = data.info["split"]
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == names  # case level, disjoint
    assert [len(parts[k]) for k in ("train", "val", "test")] == [2, 1, 1]
    assert load_dataset("brats", path=str(tmp_path), **OPTS).info["split"] == parts  # seeded
    assert len(data.train) == 6 and len(data.val) == 8  # 3 random slices per case; every slice of each volume
    labels = set()
    for i in range(len(data.train)):
        inputs, masks, target = data.train[i]
        assert inputs["flair"].shape == (1, 16, 16) and inputs["flair"].dtype == torch.float32
        assert target.shape == (16, 16) and target.dtype == torch.int64 and masks == {}
        labels |= set(target.unique().tolist())
    assert labels <= {0, 1, 2, 3}
    # label 4 became 3; per-volume normalisation: brain voxels have mean 0, std 1
    img = np.load(data.info["cache"] + f"/{names[0]}_img.npy").astype(np.float32)
    seg = np.load(data.info["cache"] + f"/{names[0]}_seg.npy")
    assert 3 in np.unique(seg) and 4 not in np.unique(seg)
    assert img.shape == (8, 4, 16, 16) and seg.shape == (8, 16, 16)
    raw = np.asarray(nib.load(str(tmp_path / names[0] / f"{names[0]}_t1.nii.gz")).dataobj)
    brain = raw != 0
    normed = (raw[brain] - raw[brain].mean()) / raw[brain].std()
    assert abs(normed.mean()) < 1e-4 and img[:, 1][img[:, 1] != 0].std() == pytest.approx(1.0, abs=0.05)


def test_brats_split_file_and_cache_reuse(tmp_path):
    names = write_brats(tmp_path)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": names[:2], "val": [names[2]], "test": [names[3]]}))
    data = load_dataset("brats", path=str(tmp_path), split_file=str(split), crop=16)
    assert data.val.cases == [names[2]]
    stamp = (tmp_path / "cggm_cache" / "brats_crop16" / f"{names[0]}_img.npy").stat().st_mtime_ns
    load_dataset("brats", path=str(tmp_path), crop=16)
    assert (tmp_path / "cggm_cache" / "brats_crop16" / f"{names[0]}_img.npy").stat().st_mtime_ns == stamp


class Oracle(torch.nn.Module):
    """Predicts the ground truth of slices it has seen (looked up by the flair slice)."""

    def __init__(self, dataset, drop_et=False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.table = {}
        for i in range(len(dataset)):
            x, _, y = dataset[i]
            if drop_et:
                y = torch.where(y == 3, torch.ones_like(y), y)
            self.table[x["flair"].numpy().tobytes()] = y

    def forward(self, inputs, masks=None):
        ys = torch.stack([self.table[x.numpy().tobytes()] for x in inputs["flair"]])
        logits = torch.nn.functional.one_hot(ys, 4).movedim(-1, 1).float() * 10
        return ModelOutput(prediction=logits, features=[inputs[m] for m in ("flair", "t1", "t1ce", "t2")])


def test_brats_volume_evaluation(tmp_path):
    write_brats(tmp_path)
    data = load_dataset("brats", path=str(tmp_path), **OPTS)
    method = build_method("joint").bind(torch.nn.Identity(), data.task, data.modalities)
    for split in (data.val, data.test):
        res = evaluate(Oracle(split), method, split, data.task, torch.device("cpu"), batch_size=3)
        # perfect inside the crop; the one oedema voxel outside the 16x16 crop is a missed WT voxel
        wt_truth = 6 * 6 * 4 + 1
        assert res["dice_wt"] == pytest.approx(2 * (wt_truth - 1) / (2 * wt_truth - 1))
        assert res["dice_tc"] == pytest.approx(1.0) and res["dice_et"] == pytest.approx(1.0)
        assert res["dice_mean"] == pytest.approx((res["dice_wt"] + 2) / 3)
        assert res == evaluate(Oracle(split), method, split, data.task, torch.device("cpu"), batch_size=5)  # deterministic
    # a case with ET predicted as necrosis: ET Dice 0 where the case has ET (case 0), 1 where neither has it
    case = data.val.cases[0]
    has_et = int(case[-1]) % 2 == 0
    res = evaluate(Oracle(data.val, drop_et=True), method, data.val, data.task, torch.device("cpu"), batch_size=4)
    assert res["dice_et"] == (0.0 if has_et else 1.0)


def _break(tmp_path, case, name, edit):
    f = tmp_path / case / f"{case}_{name}.nii.gz"
    img = nib.load(str(f))
    data = np.asarray(img.dataobj).copy()
    nib.save(nib.Nifti1Image(edit(data), np.eye(4)), str(f))
    return f


@pytest.mark.parametrize("name, edit, message", [
    ("t1", lambda d: np.where(np.arange(d.size).reshape(d.shape) == 500, np.nan, d).astype(np.float32), "NaN/inf"),
    ("seg", lambda d: np.where(d == 2, 5, d).astype(np.int16), r"labels \[5\] are out of range"),
    ("flair", lambda d: d[:20].astype(np.float32), "differs from the segmentation"),
])
def test_brats_errors_name_file(tmp_path, name, edit, message):
    names = write_brats(tmp_path)
    f = _break(tmp_path, names[1], name, edit)
    with pytest.raises(DataError, match=message) as err:
        load_dataset("brats", path=str(tmp_path), **OPTS)
    assert str(f) in str(err.value)


def test_brats_missing_file_and_no_cases(tmp_path):
    names = write_brats(tmp_path)
    (tmp_path / names[2] / f"{names[2]}_seg.nii.gz").unlink()
    with pytest.raises(DataError, match=f"{names[2]}_seg.nii.gz: missing"):
        load_dataset("brats", path=str(tmp_path), **OPTS)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no BraTS case folders"):
        load_dataset("brats", path=str(empty))
