"""The Bayes-optimal ceiling where the synthetic data is reported: demo table, sweep gap table and
figure, bench report, diagnose. Expected values are worked out by hand here."""

import math

import pytest

from cggm.data import load_dataset
from cggm.diagnostics.ceiling import gap_shares, gap_table

RESULT = {
    "imbalances": [1.0], "methods": ["joint", "cggm"], "seeds": [0, 1], "epochs": 1,
    "bayes": [{"fused": 0.80, "strong": 0.76, "weak": 0.55}],
    "rows": [
        {"imbalance": 1.0, "method": "joint", "seed": 0, "accuracy": 0.70, "weak_probe": 0.45, "weak_drop": 0.0},
        {"imbalance": 1.0, "method": "joint", "seed": 1, "accuracy": 0.72, "weak_probe": 0.35, "weak_drop": 0.0},
        {"imbalance": 1.0, "method": "cggm", "seed": 0, "accuracy": 0.75, "weak_probe": 0.50, "weak_drop": 0.0},
        {"imbalance": 1.0, "method": "cggm", "seed": 1, "accuracy": 0.72, "weak_probe": 0.55, "weak_drop": 0.0},
    ],
}


def test_gap_shares_are_paired_by_seed():
    rows = {(r["method"], r["target"]): r for r in gap_shares(RESULT)}
    # fused: seed 0 (0.75-0.70)/(0.80-0.70) = 0.5, seed 1 0/0.08 = 0; weak: 0.05/0.10 = 0.5, 0.20/0.20 = 1
    assert rows[("cggm", "fused")]["values"] == pytest.approx([0.5, 0.0])
    assert rows[("cggm", "weak")]["values"] == pytest.approx([0.5, 1.0])
    assert rows[("joint", "fused")]["values"] == pytest.approx([0.0, 0.0])
    # 95% t-interval of two values: t(1) = 12.706, sd = 0.5 / sqrt(2)
    assert rows[("cggm", "fused")]["ci95"] == pytest.approx(12.706 * (0.5 / math.sqrt(2)) / math.sqrt(2), rel=1e-3)
    table = gap_table(RESULT)
    assert "+0.25 [" in table and "+0.75 [" in table and "0.800 / 0.760 / 0.550" in table


def test_sweep_figure_draws_the_ceilings_and_the_gap_panel():
    pytest.importorskip("matplotlib")
    from cggm.commands import sweep_figure

    fig = sweep_figure(RESULT)
    assert len(fig.axes) == 4
    labels = {t.get_text() for t in fig.legends[0].get_texts()}
    assert {"Bayes-optimal, weak alone", "Bayes-optimal, fused"} <= labels
    ys = [list(line.get_ydata()) for line in fig.axes[2].get_lines() if line.get_linestyle() == "--"]
    assert [0.80] in ys
    old = {k: v for k, v in RESULT.items() if k != "bayes"}  # a sweep saved before the ceilings: no line
    assert len(sweep_figure(old).axes) == 3


def test_demo_table_ends_with_the_bayes_row():
    from cggm.demo import format_demo_table

    rows = {"joint": {"test accuracy": [0.8, 0.8], "probe weak": [0.4, 0.4], "seconds": [1.0, 1.0]}}
    table = format_demo_table(rows, 2, bayes={"test accuracy": 0.821, "probe weak": 0.549})
    last = table.splitlines()[-1].split()
    assert last[:2] == ["Bayes-optimal", "(exact)"] and last[2:] == ["0.8210", "0.5490"]


def test_report_and_diagnose_show_the_ceiling():
    from cggm.commands import _interpret
    from cggm.report import dataset_markdown

    data = load_dataset("synthetic", imbalance=1.0)
    b = data.bayes_optimal("test")
    stat = {"mean": 0.70, "std": 0.0, "ci95": 0.0, "n": 1}
    entry = {"name": "synthetic", "description": "d", "modalities": ["strong", "weak"], "bayes": b, "seconds": 1.0,
             "summary": {"joint": {"metric": "accuracy", "n": 1, "test": stat, "diff_joint": None,
                                   "probe": {"strong": stat, "weak": stat}, "drop": {"strong": stat, "weak": stat},
                                   "time_vs_joint": 1.0, "records": {}}}}
    md = dataset_markdown(entry)
    assert f"| Bayes-optimal (exact) | {b['fused']:.3f} | — | {b['fused'] - 0.70:+.3f} | {b['strong']:.3f} (alone)" in md
    d = {"run_dir": "r", "dataset": "synthetic", "method": "joint", "metric": "accuracy", "fused": 0.75,
         "drop": {"strong": 0.3, "weak": 0.01}, "probe": {"strong": 0.7, "weak": 0.4},
         "raw_probe": {"strong": 0.7, "weak": 0.3}}
    _, text = _interpret(d, data)
    assert f"- fused: 0.7500 vs {b['fused']:.4f} ({0.75 - b['fused']:+.4f})" in text
    assert f"- weak encoder probe: 0.4000 vs weak alone {b['weak']:.4f} ({0.4 - b['weak']:+.4f})" in text


def test_gap_decomposition_report(tmp_path):
    """benchmarks/bayes_gap.py --report: the three parts of Bayes - joint, worked out by hand."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bayes_gap", Path(__file__).parents[1] / "benchmarks/bayes_gap.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    bayes = {"fused": 0.80, "strong": 0.76, "weak": 0.55}
    row = {"seed": 0, "strong alone": 0.75, "exact strong x learned weak": 0.78, "learned strong x learned weak": 0.77}
    trial = {"options": {}, "val": [0.7], "test": [0.70]}
    (tmp_path / "bayes_gap.json").write_text(json.dumps({
        "seconds": 60, "epochs": 10, "seeds": [0], "weak_alone": {"0": {"budget": 0.51, "3x epochs": 0.52}},
        "per_imbalance": {"1.0": {"bayes": bayes, "rows": [row]}},
        "tuning": {"1.0": {"joint": {"trials": [trial], "selected": {}},
                           "cggm": {"trials": [trial, {"options": {"rho": 2.0}, "val": [0.8], "test": [0.75]}],
                                    "selected": {"rho": 2.0}}}}}))
    (tmp_path / "sweep.json").write_text(json.dumps({"epochs": 10, "rows": [
        {"imbalance": 1.0, "method": "joint", "seed": 0, "accuracy": 0.72, "weak_probe": 0.4},
        {"imbalance": 1.0, "method": "ume", "seed": 0, "accuracy": 0.74, "weak_probe": 0.5}]}))
    mod.report(tmp_path)
    md = (tmp_path / "bayes_gap.md").read_text()
    # 0.80 - 0.78 = +0.020 (weak alone), 0.78 - 0.77 = +0.010 (strong alone), 0.77 - 0.72 = +0.050 (joint)
    assert "+0.020 / +0.010 / +0.050" in md
    # selected on validation: rho 2.0, share (0.75 - 0.70) / (0.80 - 0.70) = 0.5
    assert '| 1 | cggm | {}: 0.700 / 0.700; {"rho": 2.0}: 0.800 / 0.750 | {"rho": 2.0} | 0.750 ± 0.000 | +0.50' in md


def test_cggm_bench_prints_the_ceiling(capsys):
    from cggm.cli import main

    assert main(["bench", "--dataset", "synthetic", "--methods", "joint", "--seeds", "1",
                 "--set", "train.epochs=1", "--set", "dataset.options.imbalance=1.0"]) == 0
    b = load_dataset("synthetic", imbalance=1.0).bayes_optimal("test")
    out = capsys.readouterr().out
    assert (f"Bayes-optimal test accuracy (exact; no method can do better in expectation): strong {b['strong']:.4f}, "
            f"weak {b['weak']:.4f}, fused {b['fused']:.4f}") in out
