"""Results that must not be silently wrong: a replaced method keeps the options it takes (and says
so), a benchmark gives each method its options, skips only refused settings, and reports mean Dice
for segmentation."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cggm import report, runner
from cggm.config import load_config
from cggm.data import DataSplits, MultimodalDataset
from cggm.data.registry import DATASETS
from cggm.methods import Method, Support
from cggm.methods.registry import METHODS
from cggm.report import HEADLINE, run_benchmark
from cggm.types import Task

# the method options of src/cggm/presets/mosi.yaml, as written there
MOSI_CGGM = {"rho": 1.3, "lam": 0.2, "classifier_lr": 0.0005, "classifier_optimizer": "adam", "classifier_layers": 2}
TINY = ["dataset.options={dim: 4, n_train: 32, n_val: 16, n_test: 16}",
        "model.options={feature_dim: 4, hidden: 8, head_hidden: 8}", "train.epochs=1", "train.batch_size=16"]


# -- 1. replacing the method keeps the options the new method takes -----------------------------------
def test_method_replacement_keeps_the_options_the_new_method_takes(caplog):
    with caplog.at_level(logging.WARNING, logger="cggm.config"):
        cfg = load_config(preset="mosi", method="cggm_official")
    assert cfg["method"] == {"name": "cggm_official", "options": MOSI_CGGM}
    [note] = [r.getMessage() for r in caplog.records if r.name == "cggm.config"]
    assert note.startswith("method cggm replaced by cggm_official: kept its options rho=1.3, lam=0.2")
    assert "classifier_layers=2" in note and "dropped" not in note


def test_method_replacement_drops_what_a_variant_sets_itself_and_says_so(caplog, tmp_path):
    # cggm_magnitude is partial(CGGM, lam=0.0, direction="off"): the preset's lam=0.2 is not its lam
    with caplog.at_level(logging.WARNING, logger="cggm.config"):
        cfg = load_config(preset="mosi", method="cggm_magnitude")
    assert cfg["method"]["options"] == {k: v for k, v in MOSI_CGGM.items() if k != "lam"}
    assert "dropped lam=0.2 (cggm_magnitude sets it itself)" in caplog.text
    # cggm_official is a classmethod forwarding **kwargs to CGGM and choosing direction="weight" itself
    path = tmp_path / "run.yaml"
    path.write_text("method: {name: cggm, options: {rho: 1.1, direction: gradient, classifier_layers: 3}}\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cggm.config"):
        cfg = load_config(path, method="cggm_official")
    assert cfg["method"]["options"] == {"rho": 1.1, "classifier_layers": 3}
    assert "dropped direction=gradient (cggm_official sets it itself)" in caplog.text
    # an override after the replacement still sets any option of the new method
    cfg = load_config(path, method="cggm_official", overrides=["method.options.direction=gradient"])
    assert cfg["method"]["options"]["direction"] == "gradient"


def test_method_replacement_does_not_carry_an_option_to_another_method(caplog, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: {name: ogm_ge, options: {alpha: 0.5, noise: false}}\n")
    with caplog.at_level(logging.WARNING, logger="cggm.config"):
        assert load_config(path, method="ogm")["method"]["options"] == {"alpha": 0.5}  # ogm is OGM-GE without noise
    assert "dropped noise=False (not an option of ogm)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cggm.config"):
        # UMT has a `lam` too (its distillation weight): CGGM's lam=0.2 must not become it
        assert load_config(preset="mosi", method="umt")["method"]["options"] == {}
    assert "lam=0.2 (umt is not a variant of cggm)" in caplog.text


def test_cggm_train_with_another_method_keeps_and_reports_the_options(tmp_path):
    """The real command line: the configured CGGM options reach cggm_official, one stderr line says so."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: {name: cggm, options: {rho: 1.2, classifier_layers: 2}}\n")
    out = tmp_path / "run"
    script = Path(sys.executable).parent / "cggm"  # the installed entry point, as a user runs it
    entry = [str(script)] if script.is_file() else [sys.executable, "-m", "cggm"]
    cli = [*entry, "train", "--preset", "synthetic", "--config", str(cfg), "--method",
           "cggm_official", "--quiet", "--device", "cpu", "--output", str(out)]
    for item in TINY:
        cli += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "replaced by" in ln]
    assert lines == ["method cggm replaced by cggm_official: kept its options rho=1.2, lam=0.2, classifier_layers=2"]
    import yaml

    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["method"] == {"name": "cggm_official", "options": {"rho": 1.2, "lam": 0.2, "classifier_layers": 2}}


class _Result:
    test = {"loss": 0.5, "accuracy": 0.5}
    val = {"loss": 0.5, "accuracy": 0.5}
    best_epoch, seconds_per_epoch, skipped_steps = 0, 0.1, 0


def test_bench_runs_variants_with_the_configured_options_and_others_with_their_defaults(monkeypatch):
    ran = []

    def fake_run(run_cfg, data=None, **_):
        ran.append((run_cfg["method"]["name"], run_cfg["method"]["options"]))
        return _Result(), None

    monkeypatch.setattr(runner, "run_config", fake_run)
    cfg = load_config(overrides=TINY + ["method.name=cggm", "method.options={rho: 1.1, lam: 0.3, classifier_layers: 2}"])
    lines: list[str] = []
    runner.bench(cfg, ["cggm", "cggm_official", "cggm_magnitude", "umt", "agm"], [0],
                 method_options={"agm": {"alpha": 0.2}}, log=lines.append)
    assert dict(ran) == {"cggm": {"rho": 1.1, "lam": 0.3, "classifier_layers": 2},
                         "cggm_official": {"rho": 1.1, "lam": 0.3, "classifier_layers": 2},
                         "cggm_magnitude": {"rho": 1.1, "classifier_layers": 2},
                         "umt": {}, "agm": {"alpha": 0.2}}
    text = "\n".join(lines)
    assert "cggm_magnitude: cggm's options rho=1.1, classifier_layers=2; not lam=0.3 (cggm_magnitude sets it itself)" \
        in text
    assert "umt: its own default options" in text


def test_run_benchmark_gives_each_method_its_comparison_options(monkeypatch):
    seen = {}

    def fake_run_one(cfg, data, label, method, options, seed, keep_records=False):
        seen[label] = options
        return {"dataset": data.name, "label": label, "method": method, "options": options, "seed": seed,
                "metric": "accuracy", "test": 0.5, "probe": {}, "drop": {m: 0.0 for m in data.modalities},
                "seconds_per_epoch": 0.1, "best_epoch": 0, "records": {}}

    monkeypatch.setattr(report, "run_one", fake_run_one)
    cfg = load_config(overrides=TINY + ["method.name=cggm", "method.options={rho: 1.1, classifier_layers: 2}"])
    run_benchmark(cfg, ["synthetic"], ["joint", "cggm", "cggm_paper", "unimodal"], [0], log=lambda _: None)
    assert seen == {"joint": {}, "cggm": {"rho": 1.1, "classifier_layers": 2},
                    "cggm_paper": {"rho": 1.1, "classifier_layers": 2},
                    "unimodal[strong]": {"modality": "strong"}, "unimodal[weak]": {"modality": "weak"}}


# -- 2. a benchmark skips a refused setting, and nothing else ------------------------------------------
class _RegressionOnly(Method):
    name = "regression_only"
    support = Support(tasks=("regression",))


class _Buggy(Method):
    name = "buggy"

    def setup(self) -> None:
        raise TypeError("a bug in the method")


def test_run_benchmark_skips_only_unsupported_settings(monkeypatch):
    monkeypatch.setitem(METHODS, "regression_only", _RegressionOnly)
    monkeypatch.setitem(METHODS, "buggy", _Buggy)
    cfg = load_config(overrides=TINY)
    res = run_benchmark(cfg, ["synthetic"], ["regression_only", "joint"], [0], log=lambda _: None)
    entry = res["datasets"][0]
    assert entry["skipped"] == {"regression_only": "UnsupportedSettingError: Method 'regression_only' supports "
                                                   "tasks ['regression'], not 'classification'."}
    assert [r["label"] for r in entry["runs"]] == ["joint"]
    # any other error is not a skip: the run is recorded as failed, the others go on, and the
    # benchmark raises at the end naming it (tests/test_bench_failures.py)
    with pytest.raises(runner.BenchmarkError, match="synthetic buggy seed 0: TypeError: a bug in the method") as err:
        run_benchmark(cfg, ["synthetic"], ["buggy", "joint"], [0], log=lambda _: None)
    [entry] = err.value.report["datasets"]
    assert entry["skipped"] == {} and [r["label"] for r in entry["runs"]] == ["joint"]
    assert [(f["label"], f["seed"], f["error"]) for f in entry["failed"]] == [("buggy", 0, "TypeError: a bug in the method")]


# -- 3. segmentation's headline is mean Dice --------------------------------------------------------
def _tiny_segmentation(seed: int = 0) -> DataSplits:
    g = torch.Generator().manual_seed(seed)

    def split(n):
        target = torch.randint(0, 3, (n, 12, 12), generator=g)
        inputs = {m: target[:, None].float() + 0.5 * torch.randn(n, 1, 12, 12, generator=g) for m in ("a", "b")}
        return MultimodalDataset(inputs, target, source="tiny_seg")

    return DataSplits("tiny_seg", Task("segmentation", 3), split(16), split(8), split(8), "tiny segmentation")


def test_segmentation_reports_mean_dice(monkeypatch):
    monkeypatch.setitem(DATASETS, "tiny_seg", lambda: _tiny_segmentation())
    cfg = load_config(overrides=["dataset.name=tiny_seg", "model.arch=paper_seg", "model.options={width: 4}",
                                 "train.epochs=1", "train.batch_size=8"])
    res = run_benchmark(cfg, ["tiny_seg"], ["joint"], [0], log=lambda _: None)
    entry = res["datasets"][0]
    assert entry["skipped"] == {}
    [run] = entry["runs"]
    assert run["metric"] == "dice_mean" and run["test"] == run["test_all"]["dice_mean"]
    assert 0.0 <= run["test"] <= 1.0 and run["removal_full"] == pytest.approx(run["test"])
    assert all(math.isnan(v) for v in run["probe"].values())  # maps are not linearly probed
    assert entry["summary"]["joint"]["metric"] == "dice_mean"
    assert HEADLINE["segmentation"] == ("dice_mean", "max")  # higher is better: a removal drop is full - without
