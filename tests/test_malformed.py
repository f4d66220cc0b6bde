"""Malformed inputs through the CLI, config files and the Python API: each is refused with a message
that names the problem, and an existing output directory is left byte-for-byte as it was."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from cggm import cli
from cggm.config import ConfigError, apply_override, load_config
from cggm.data import DataError, DataSplits, MultimodalDataset, load_dataset
from cggm.methods import Method, Support, UnsupportedSettingError, build_method
from cggm.models.factory import build_model
from cggm.training import TrainConfig, Trainer
from cggm.types import Task

TINY = ["--set", "dataset.options={dim: 4, n_train: 32, n_val: 16, n_test: 16}",
        "--set", "model.options={feature_dim: 4, hidden: 8, head_hidden: 8}",
        "--set", "train.epochs=1", "--set", "train.batch_size=16"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory):
    """An output directory holding a finished CGGM run (config.yaml, checkpoints, result.json)."""
    out = tmp_path_factory.mktemp("malformed") / "run"
    assert cli.main(["train", "--preset", "synthetic", "--quiet", *TINY, "--output", str(out)]) == 0
    (out / "notes.txt").write_text("a user's file")
    return out, _snapshot(out)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "bad.yaml").write_text("train:\n  epochs: [1, 2\n  lr: 0.1\n")
    (d / "sections.yaml").write_text("trainer:\n  epochs: 3\n")
    (d / "list.yaml").write_text("- train\n- epochs\n")
    (d / "corrupt.pkl").write_bytes(pickle.dumps({"train": {}})[:9])
    return d


def _cases(files: Path):
    base = ["--preset", "synthetic", "--quiet", *TINY]
    return {
        "unknown method": ([*base, "--method", "nosuch"], "Unknown method 'nosuch'"),
        "unknown preset": (["--preset", "nosuch", "--quiet"], "Unknown preset 'nosuch'"),
        "unknown dataset": ([*base, "--dataset", "nosuch"], "dataset.name: unknown dataset 'nosuch' (known: "),
        "unknown arch": ([*base, "--set", "model.arch=resnet"], "model.arch: unknown model architecture 'resnet' (known: "),
        "one modality": ([*base, "--set", "dataset.options.num_modalities=1"], "num_modalities must be >= 2, got 1"),
        "empty split": ([*base, "--set", "dataset.options.n_val=0"], "synthetic[val]: the split is empty"),
        "override without =": ([*base, "--set", "train.epochs"], "Override 'train.epochs' must look like section.key=value"),
        "unknown train key": ([*base, "--set", "train.epoch=3"], "train.epoch: unknown setting (known: "),
        "unknown section": ([*base, "--set", "trian.epochs=3"], "Override 'trian.epochs=3': the first key must be one of"),
        "unknown model option": ([*base, "--set", "model.options.bogus=1"], "model.options.bogus: not an option of mlp (options: "),
        "unknown method option": ([*base, "--set", "method.options.gamma=1"], "method.options.gamma: not an option of cggm (options: "),
        "bad yaml": ([*base, "--config", str(files / "bad.yaml")], "bad.yaml is not valid YAML"),
        "yaml not a mapping": ([*base, "--config", str(files / "list.yaml")], "list.yaml must be a mapping of sections"),
        "unknown config section": ([*base, "--config", str(files / "sections.yaml")], "trainer: unknown section (sections: "),
        "missing config file": ([*base, "--config", str(files / "nope.yaml")], "nope.yaml does not exist"),
        "negative batch size": ([*base, "--set", "train.batch_size=-8"], "batch_size must be >= 1, got -8"),
        "zero epochs": ([*base, "--set", "train.epochs=0"], "epochs must be >= 1, got 0"),
        "non-numeric lr": ([*base, "--set", "train.lr=fast"], "train.lr must be a finite number, got 'fast'"),
        "unknown optimizer": ([*base, "--set", "train.optimizer=adagrad"], "optimizer must be adam, adamw or sgd, got 'adagrad'"),
        "unknown on_nonfinite": ([*base, "--set", "train.on_nonfinite=ignore"], "on_nonfinite must be stop or skip"),
        "rho <= 0": ([*base, "--set", "method.options.rho=0"], "CGGM rho must be a finite number > 0, got 0"),
        "lambda < 0": ([*base, "--set", "method.options.lam=-0.5"], "CGGM lam (lambda) must be a finite number >= 0, got -0.5"),
        "too many modalities for the method": (
            [*base, "--method", "agm", "--set", "method.options={}", "--set", "dataset.options.num_modalities=7"],
            "Method 'agm' supports 2 to 6 modalities, got 7"),
        "missing data path": (["--quiet", "--dataset", "mosi", "--data-path", str(files / "no_such_dir")],
                              "MOSI feature pickle not found"),
        "corrupt pickle": (["--quiet", "--dataset", "mosi", "--data-path", str(files / "corrupt.pkl")],
                           "corrupt.pkl: cannot read the pickle"),
        "checkpoint of another method": ([*base, "--method", "joint", "--set", "method.options={}"],
                                         "its settings differ (method.name: 'cggm' -> 'joint'"),
        "checkpoint of another model": ([*base, "--set", "model.options.feature_dim=6"], "its settings differ (model.options.feature_dim: 4 -> 6)"),
    }


CASES = list(_cases(Path("/")))


@pytest.mark.parametrize("case", CASES)
def test_cli_refuses_malformed_input_and_keeps_the_output_directory(case, previous_run, files, capsys):
    out, before = previous_run
    argv, message = _cases(files)[case]
    capsys.readouterr()
    assert cli.main(["train", *argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cggm train: error: ") and message in err, err
    assert "Traceback" not in err
    assert _snapshot(out) == before, "the failing command changed the output directory"


# -- the Python API ------------------------------------------------------------------------------
TASK = Task("classification", 3)


def _ds(n=6, **over):
    inputs = {"a": torch.randn(n, 4), "b": torch.randn(n, 3)}
    inputs.update(over)
    return inputs


def test_api_one_modality():
    with pytest.raises(DataError, match=r"needs at least 2 modalities, got \['a'\]"):
        MultimodalDataset({"a": torch.randn(6, 4)}, torch.zeros(6, dtype=torch.long), source="mine")


def test_api_modalities_with_different_numbers_of_rows():
    with pytest.raises(DataError, match=r"mine: modality 'b' has 5 rows but the target has 6"):
        MultimodalDataset(_ds(b=torch.randn(5, 3)), torch.zeros(6, dtype=torch.long), source="mine")


def test_api_batch_with_mismatched_modalities_at_the_model():
    model = build_model("mlp", {"a": (4,), "b": (3,)}, TASK)
    with pytest.raises(ValueError, match=r"Modalities disagree on the batch size: \{'a': 5, 'b': 6\}"):
        model({"a": torch.randn(5, 4), "b": torch.randn(6, 3)})


def test_api_labels_out_of_range():
    good = MultimodalDataset(_ds(), torch.tensor([0, 1, 2, 0, 1, 2]), source="val")
    bad = MultimodalDataset(_ds(), torch.tensor([0, 1, 2, 3, 1, -1]), source="train")
    with pytest.raises(DataError, match=r"train: labels range over \[-1, 3\] but the task has 3 classes"):
        DataSplits("mine", TASK, bad, good, good)


def test_api_empty_split():
    with pytest.raises(DataError, match="test: the split is empty"):
        MultimodalDataset({"a": torch.randn(0, 4), "b": torch.randn(0, 3)}, torch.zeros(0, dtype=torch.long),
                          source="test")


def test_api_nan_features():
    a = torch.randn(6, 4)
    a[3, 1] = float("nan")
    with pytest.raises(DataError, match=r"modality 'a' has 1 NaN/inf values \(first in sample 3\)"):
        MultimodalDataset(_ds(a=a), torch.zeros(6, dtype=torch.long), source="mine")


def test_api_corrupt_mosi_pickle(files):
    with pytest.raises(DataError, match="corrupt.pkl: cannot read the pickle"):
        load_dataset("mosi", path=files / "corrupt.pkl")


def test_api_unknown_method_and_bad_cggm_options():
    with pytest.raises(ValueError, match="Unknown method 'nosuch'. Known methods: .*cggm"):
        build_method("nosuch")
    with pytest.raises(ValueError, match="rho must be a finite number > 0, got -1"):
        build_method("cggm", rho=-1)
    with pytest.raises(ValueError, match=r"lam \(lambda\) must be a finite number >= 0, got -0.1"):
        build_method("cggm", lam=-0.1)


def test_api_method_that_does_not_support_three_modalities():
    class TwoOnly(Method):
        name = "two-only"
        support = Support(max_modalities=2)

    data = load_dataset("synthetic", num_modalities=3, dim=4, n_train=16, n_val=8, n_test=8)
    model = build_model("mlp", data.input_shapes, data.task, feature_dim=4, hidden=8, head_hidden=8)
    with pytest.raises(UnsupportedSettingError, match="'two-only' supports 2 to 2 modalities, got 3"):
        Trainer(model, TwoOnly(), data, TrainConfig(progress=False))


def test_api_config_errors():
    with pytest.raises(ConfigError, match="Unknown preset 'nosuch'"):
        load_config(preset="nosuch")
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        apply_override({}, "train.lr")
    with pytest.raises(ValueError, match="batch_size must be >= 1, got -1"):
        TrainConfig(batch_size=-1)
    assert TrainConfig(lr="1e-3").lr == 1e-3  # YAML reads 1e-3 as a string; it is still a number
