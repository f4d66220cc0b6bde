"""Bench report (Markdown + CSV), plots, the imbalance sweep and diagnose, on tiny synthetic data."""

from __future__ import annotations

import csv
import json

import pytest

from cggm.cli import main

TINY = ["--set", "dataset.options.n_train=240", "--set", "dataset.options.n_val=80", "--set",
        "dataset.options.n_test=160", "--set", "train.epochs=1", "--set", "train.batch_size=32"]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report"
    rc = main(["bench", "--datasets", "synthetic", "--methods", "joint,cggm", "--seeds", "2", "--report", str(out),
               *TINY])
    assert rc == 0
    return out


def test_bench_report_markdown_and_csv(bench_dir):
    md = (bench_dir / "report.md").read_text()
    assert "### synthetic" in md
    assert "Δ vs joint, paired [95% CI]" in md and "probe strong" in md and "drop w/o weak" in md
    assert "| joint |" in md and "| cggm |" in md and "(reference)" in md
    assert "time/epoch vs joint" in md and "1.00x" in md
    assert "B/weak" in md  # CGGM's internals table
    rows = list(csv.DictReader((bench_dir / "summary.csv").open()))
    assert [r["label"] for r in rows] == ["joint", "cggm"]
    for r in rows:
        assert r["n"] == "2" and 0 <= float(r["mean"]) <= 1
        assert float(r["ci95_low"]) <= float(r["mean"]) <= float(r["ci95_high"])
        assert r["probe_weak"] and r["drop_strong"]
    joint, cg = rows
    assert joint["diff_joint_mean"] == "nan" and cg["diff_joint_mean"] != "nan"
    assert abs(float(joint["time_vs_joint"]) - 1.0) < 1e-9
    runs = list(csv.DictReader((bench_dir / "runs.csv").open()))
    assert len(runs) == 4 and {r["seed"] for r in runs} == {"0", "1"}
    # the paired difference is the mean of per-seed differences
    per = {(r["label"], r["seed"]): float(r["test"]) for r in runs}
    diff = sum(per[("cggm", s)] - per[("joint", s)] for s in ("0", "1")) / 2
    assert abs(diff - float(cg["diff_joint_mean"])) < 1e-9
    bench = json.loads((bench_dir / "bench.json").read_text())
    assert bench["datasets"][0]["summary"]["cggm"]["test"]["n"] == 2


def test_plot_from_bench_and_train_dirs(bench_dir, tmp_path):
    assert main(["plot", str(bench_dir)]) == 0
    png = bench_dir / "records_synthetic.png"
    assert png.is_file() and png.stat().st_size > 1000


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    assert main(["train", "--method", "cggm", "--output", str(out), "--quiet", *TINY]) == 0
    return out


def test_plot_of_a_train_dir(train_dir, tmp_path):
    assert main(["plot", str(train_dir), "--output", str(tmp_path)]) == 0
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 1000


def test_diagnose_a_trained_run(train_dir, capsys, tmp_path):
    assert main(["diagnose", str(train_dir), "--json", str(tmp_path / "d.json")]) == 0
    text = capsys.readouterr().out
    assert "drop w/o it" in text and "encoder probe" in text and "Verdict:" in text
    d = json.loads((tmp_path / "d.json").read_text())
    assert set(d["drop"]) == set(d["probe"]) == set(d["raw_probe"]) == {"strong", "weak"}
    assert set(d["verdict"].values()) <= {"used", "under-used", "under-trained encoder", "uninformative"}
    assert 0 <= d["fused"] <= 1


def test_diagnose_needs_a_train_dir(tmp_path, capsys):
    assert main(["diagnose", str(tmp_path)]) == 2
    assert "config.yaml" in capsys.readouterr().err


def test_imbalance_sweep_writes_plot(tmp_path):
    from cggm.commands import run_sweep

    res = run_sweep([0.0, 3.0], ["joint", "cggm"], [0], epochs=1, out_dir=tmp_path, log=lambda s: None,
                    dataset_options={"n_train": 200, "n_val": 60, "n_test": 120})
    assert len(res["rows"]) == 4
    png = tmp_path / "sweep.png"
    assert png.is_file() and png.stat().st_size > 1000
    assert (tmp_path / "sweep.csv").read_text().count("\n") == 5
