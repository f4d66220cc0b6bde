"""A benchmark writes each run as it ends, records a failed run (method, seed, error) while the
others go on, exits non-zero naming the failed runs, and a re-run keeps the finished runs."""

from __future__ import annotations

import json
import re

import pytest

from cggm import cli, report, runner
from cggm.config import ConfigError, load_config
from cggm.runner import BenchmarkError
from cggm.training import NonFiniteError

TINY = ["dataset.options={dim: 4, n_train: 32, n_val: 16, n_test: 16}",
        "model.options={feature_dim: 4, hidden: 8, head_hidden: 8}", "train.epochs=1", "train.batch_size=16"]
CLI_TINY = [a for item in TINY for a in ("--set", item)]


class _Result:
    def __init__(self, seed):
        self.test = {"loss": 0.5, "accuracy": 0.5 + seed / 10}
        self.val = {"loss": 0.5, "accuracy": 0.5}
        self.best_epoch, self.seconds_per_epoch, self.skipped_steps = 0, 0.1, 0


def _fake_runs(monkeypatch, output, fail=(), ran=None):
    """runner.run_config that fails for the (method, seed) in ``fail`` and checks, before each run,
    that the runs before it are already in ``output``."""
    ran = [] if ran is None else ran

    def run_config(run_cfg, data=None, **_):
        name, seed = run_cfg["method"]["name"], run_cfg["train"]["seed"]
        if ran:
            assert output.exists(), "nothing written after the first run"
            written = json.loads(output.read_text())
            done = {(r["method"], r["seed"]) for r in written["runs"]} | \
                   {(f["method"], f["seed"]) for f in written["failed"]}
            assert set(ran) <= done, f"runs {set(ran) - done} not written as they ended"
        ran.append((name, seed))
        if (name, seed) in fail:
            raise NonFiniteError(f"Training diverged at step 3 (of {name})")
        return _Result(seed), None

    monkeypatch.setattr(runner, "run_config", run_config)
    return ran


def test_bench_writes_runs_as_they_end_and_goes_on_after_a_failed_run(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    cfg = load_config(overrides=TINY)
    ran = _fake_runs(monkeypatch, out, fail={("joint", 1)})
    with pytest.raises(BenchmarkError) as err:
        runner.bench(cfg, ["joint", "cggm"], [0, 1], output=out, log=lambda _: None)
    assert ran == [("joint", 0), ("joint", 1), ("cggm", 0), ("cggm", 1)]  # the others went on
    assert "1 run of the benchmark failed" in str(err.value)
    assert "joint seed 1: NonFiniteError: Training diverged at step 3" in str(err.value)
    written = json.loads(out.read_text())
    assert [(r["method"], r["seed"]) for r in written["runs"]] == [("joint", 0), ("cggm", 0), ("cggm", 1)]
    [failed] = written["failed"]
    assert (failed["method"], failed["seed"]) == ("joint", 1) and failed["error"].startswith("NonFiniteError: ")
    assert "Traceback" in failed["traceback"]
    assert written["summary"]["joint"]["accuracy"]["n"] == 1
    # run again: the finished runs are kept, only the failed one runs
    again = _fake_runs(monkeypatch, out)
    result = runner.bench(cfg, ["joint", "cggm"], [0, 1], output=out, log=lambda _: None)
    assert again == [("joint", 1)]
    assert sorted((r["method"], r["seed"]) for r in result["runs"]) == [("cggm", 0), ("cggm", 1), ("joint", 0),
                                                                        ("joint", 1)]
    assert json.loads(out.read_text())["failed"] == []


def test_bench_refuses_an_output_of_other_settings_and_keeps_it(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    _fake_runs(monkeypatch, out)
    runner.bench(load_config(overrides=TINY), ["joint"], [0], output=out, log=lambda _: None)
    before = out.read_text()
    with pytest.raises(ConfigError, match="holds a benchmark of other settings .*config.*use another output"):
        runner.bench(load_config(overrides=TINY + ["train.lr=0.01"]), ["joint"], [0], output=out, log=lambda _: None)
    assert out.read_text() == before


def test_the_bench_command_exits_1_naming_the_failed_runs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.json"
    _fake_runs(monkeypatch, out, fail={("cggm", 0)})
    rc = cli.main(["bench", *CLI_TINY, "--methods", "joint,cggm", "--seeds", "1", "--output", str(out)])
    assert rc == 1
    captured = capsys.readouterr()
    assert re.search(r"cggm +seed 0: FAILED: NonFiniteError", captured.out)
    assert re.search(r"cggm +- \(no finished run\)", captured.out)  # (not nan +- nan)
    assert "cggm bench: error: 1 run of the benchmark failed" in captured.err
    assert "cggm seed 0: NonFiniteError: Training diverged" in captured.err
    assert [r["method"] for r in json.loads(out.read_text())["runs"]] == ["joint"]


def test_a_report_is_written_as_runs_end_and_a_failed_run_is_named(tmp_path, monkeypatch, capsys):
    out = tmp_path / "rep"
    ran, fail = [], {("joint", 1)}

    def run_one(cfg, data, label, method, options, seed, keep_records=False):
        if ran and fail:  # the runs before this one are in the report already
            rows = (out / "runs.csv").read_text().splitlines()[1:]
            failed = [f for e in json.loads((out / "bench.json").read_text())["datasets"] for f in e["failed"]]
            assert len(rows) + len(failed) == len(ran), "runs not written as they ended"
        ran.append((label, seed))
        if (label, seed) in fail:
            raise FloatingPointError("loss is nan")
        run = {"dataset": data.name, "label": label, "method": method, "options": options, "seed": seed,
               "metric": "accuracy", "test": 0.5, "probe": {}, "drop": {m: 0.0 for m in data.modalities},
               "seconds_per_epoch": 0.1, "best_epoch": 0, "records": {}}
        return {**run, "records_full": {}, "history": []} if keep_records else run

    monkeypatch.setattr(report, "run_one", run_one)
    args = ["bench", *CLI_TINY, "--methods", "joint,cggm", "--seeds", "2", "--report", str(out)]
    assert cli.main(args) == 1
    assert ran == [("joint", 0), ("joint", 1), ("cggm", 0), ("cggm", 1)]  # the others went on
    err = capsys.readouterr().err
    assert "synthetic joint seed 1: FloatingPointError: loss is nan" in err
    assert "| joint | FAILED (seed 1): FloatingPointError: loss is nan |" in (out / "report.md").read_text()
    assert len((out / "runs.csv").read_text().splitlines()) == 1 + 3
    # run again: only the failed run runs, and the report holds all four
    ran.clear()
    fail.clear()
    assert cli.main(args) == 0
    assert ran == [("joint", 1)]
    assert len((out / "runs.csv").read_text().splitlines()) == 1 + 4
