"""One smoke test per paper preset: the preset as shipped, tiny model options, two training steps
and an evaluation on a fixture in the dataset's real file format, on CPU."""

import math

import pytest
import torch
from paper_fixtures import write_brats, write_food_cache, write_iemocap, write_mosi

from cggm.config import load_config, train_config
from cggm.data import load_dataset
from cggm.methods import build_method
from cggm.models import build_model
from cggm.training.trainer import Trainer

TINY_SEQ = ["model.options.d_model=8", "model.options.heads=2", "model.options.encoder_layers=1",
            "model.options.fusion_layers=1", "method.options.classifier_layers=1"]
# 8 training samples at batch size 4: two training steps in one epoch
RUN = ["train.epochs=1", "train.batch_size=4", "train.eval_batch_size=8", "train.progress=false"]


def _fixture(name, tmp_path):
    if name == "mosi":
        write_mosi(tmp_path, sizes=(8, 4, 4))
        return [], TINY_SEQ
    if name == "iemocap":
        pytest.importorskip("h5py")
        write_iemocap(tmp_path, sizes=(8, 4, 4), long_audio=40)
        return ["dataset.options.max_len={audio: 60}"], TINY_SEQ
    if name == "food101":
        write_food_cache(tmp_path, n=(9, 4))
        return ["dataset.options.val_fraction=0.2"], TINY_SEQ
    pytest.importorskip("nibabel")
    write_brats(tmp_path)
    return ["dataset.options.crop=16", "dataset.options.fractions=[0.5, 0.25, 0.25]",
            "dataset.options.slices_per_case=4", "dataset.options.workers=1"], ["model.options.width=2"]


def _run(cfg):
    data = load_dataset(cfg["dataset"]["name"], **cfg["dataset"]["options"])
    model = build_model(cfg["model"]["arch"], data.input_shapes, data.task, **cfg["model"]["options"])
    method = build_method(cfg["method"]["name"], **cfg["method"]["options"])
    trainer = Trainer(model, method, data, train_config(cfg))
    return data, method, trainer.fit()


@pytest.mark.parametrize("preset", ["food101", "mosi", "iemocap", "brats"])
def test_paper_preset_smoke(preset, tmp_path):
    data_opts, model_opts = _fixture(preset, tmp_path)
    cfg = load_config(preset=preset, overrides=[f"dataset.options.path={tmp_path}", *data_opts, *model_opts, *RUN])
    assert cfg["method"]["name"] == "cggm"
    _data, method, result = _run(cfg)
    assert len(result.history) == 1
    assert method.global_step == 2
    expected = {"food101": ["accuracy", "f1_weighted"], "iemocap": ["accuracy", "f1_weighted"],
                "mosi": ["mae", "corr", "acc7", "acc2_nonneg", "acc2_nonzero", "f1_nonneg", "f1_nonzero"],
                "brats": ["dice_wt", "dice_tc", "dice_et", "dice_mean"]}[preset]
    for split in (result.val, result.test):
        for key in expected + ["loss"]:
            assert key in split and (math.isfinite(split[key]) or key == "corr"), (key, split)
        assert any(k.startswith("clf/") for k in split)  # CGGM's classifiers were trained and evaluated
    if preset == "brats":
        assert result.test["cases"] == 1.0

    # --method joint: the same preset with joint training (the method's options dropped)
    joint = load_config(preset=preset, overrides=[f"dataset.options.path={tmp_path}", *data_opts, *model_opts, *RUN,
                                                  "method.name=joint", "method.options=null"])
    torch.manual_seed(0)
    _, method, result = _run(joint)
    assert method.global_step == 2 and math.isfinite(result.test["loss"])
