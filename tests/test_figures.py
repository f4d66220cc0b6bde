"""The figures can be read without the code: axis labels with meaning, the smoothing stated, legend
entries "<method> · <modality>" outside the axes, and B drawn only for methods that apply it."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from cggm.cli import main  # noqa: E402
from cggm.diagnostics import plots  # noqa: E402

DOT = " \u00b7 "


def _records(steps: int = 60, big_b: bool = False) -> dict[str, list[float]]:
    t = np.linspace(0, 1, steps)
    b = 1e6 * np.sign(np.sin(9 * t)) if big_b else 0.65 + 0.3 * np.sin(6 * t)
    return {"eps/strong": list(0.3 + 0.5 * t), "eps/weak": list(0.3 + 0.1 * t), "B/strong": list(b),
            "B/weak": list(1.3 - b), "cos/strong": list(0.2 + 0 * t), "cos/weak": list(0.1 + 0 * t),
            "L_gm": list(0.5 - 0.1 * t)}


def _labels(fig) -> list[str]:
    """Legend entries, figure legends first, then any legend inside an axes (each once)."""
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return list(dict.fromkeys(t.get_text() for legend in legends for t in legend.get_texts()))


def _panel_lines(fig) -> dict[str, set[tuple]]:
    """y label -> the (colour, style) of its lines, to tell which legend entries it draws."""
    return {ax.get_ylabel(): {(line.get_color(), line.get_linestyle()) for line in ax.get_lines()}
            for ax in fig.axes}


def _entries(fig) -> dict[tuple, str]:
    return {(h.get_color(), h.get_linestyle()): t.get_text()
            for legend in fig.legends for h, t in zip(legend.legend_handles if hasattr(legend, "legend_handles")
                                                     else legend.legendHandles, legend.get_texts())}


def _drawn(fig, ylabel_start: str) -> set[str]:
    entries = _entries(fig)
    lines = next(v for k, v in _panel_lines(fig).items() if k.startswith(ylabel_start))
    return {entries[s] for s in lines}


def test_records_figure_labels_smoothing_and_legend_outside():
    fig = plots.records_figure({"cggm": _records()}, window=50, metric="accuracy", title="t")
    ylabels = [ax.get_ylabel() for ax in fig.axes]
    assert ylabels[0].startswith("classifier accuracy eps") and ylabels[1].startswith("magnitude factor B")
    assert "cos" in ylabels[2] and ylabels[3].startswith("L_gm")
    assert all(ax.get_xlabel() == "training step" for ax in fig.axes)
    assert "moving average over 50 training steps" in fig._suptitle.get_text()
    assert all(ax.get_legend() is None for ax in fig.axes)  # one figure legend, below the panels
    assert fig.legends[0].get_bbox_to_anchor().y0 <= fig.bbox.y0
    assert _labels(fig) == [f"cggm{DOT}strong", f"cggm{DOT}weak", f"cggm{DOT}L_gm"]
    raw = plots.records_figure({"cggm": _records()}, window=1)
    assert "no smoothing" in raw._suptitle.get_text() and "metric eps" in raw.axes[0].get_ylabel()
    plots._plt().close("all")


def test_an_unbounded_b_gets_a_symlog_axis_so_bounded_runs_stay_readable():
    fig = plots.records_figure({"cggm": _records(), "cggm_paper": _records(big_b=True)}, prefixes=("B/", "eps/"))
    b_ax, eps_ax = fig.axes
    assert b_ax.get_yscale() == "symlog" and "symlog" in b_ax.get_ylabel()
    assert eps_ax.get_yscale() == "linear"
    plots._plt().close("all")


def test_demo_figure_draws_b_only_for_cggm():
    from cggm.demo import demo_figure

    fig = demo_figure({"joint": _records(), "cggm (robust rule)": _records()})
    assert _drawn(fig, "classifier accuracy eps") == {f"joint{DOT}strong", f"joint{DOT}weak",
                                                      f"cggm (robust rule){DOT}strong", f"cggm (robust rule){DOT}weak"}
    assert _drawn(fig, "magnitude factor B") == {f"cggm (robust rule){DOT}strong", f"cggm (robust rule){DOT}weak"}
    assert "moving average over 25" in fig._suptitle.get_text() and "no B" in fig._suptitle.get_text()
    plots._plt().close("all")


@pytest.fixture
def figures(monkeypatch):
    """The figures the CLI saves (they are written too)."""
    saved = []
    original = plots.save_figure

    def keep(fig, path):
        saved.append(fig)
        return original(fig, path)

    monkeypatch.setattr(plots, "save_figure", keep)
    return saved


def test_cggm_plot_of_a_train_dir_names_method_and_modality(tmp_path, figures):
    train = tmp_path / "run1"
    train.mkdir()
    (train / "config.yaml").write_text("dataset:\n  name: synthetic\nmethod:\n  name: cggm_paper\n  options: {}\n")
    (train / "result.json").write_text(json.dumps({"val": {"accuracy": 0.5}, "records": _records(big_b=True)}))
    assert main(["plot", str(train), "--output", str(tmp_path / "out")]) == 0
    fig = figures[-1]
    assert _labels(fig) == [f"cggm_paper{DOT}strong", f"cggm_paper{DOT}weak", f"cggm_paper{DOT}L_gm"]
    assert fig.axes[0].get_ylabel().startswith("classifier accuracy eps")
    assert (tmp_path / "out" / "records_run1.png").stat().st_size > 1000


def test_cggm_plot_of_a_bench_dir_names_methods_and_the_window(tmp_path, figures):
    bench = tmp_path / "bench"
    (bench / "records" / "synthetic").mkdir(parents=True)
    for method in ("joint", "cggm"):
        records = _records() if method == "cggm" else {}
        (bench / "records" / "synthetic" / f"{method}.json").write_text(json.dumps(
            {"records": records, "history": [{"epoch": 0, "val/accuracy": 0.5}]}))
    assert main(["plot", str(bench), "--window", "10"]) == 0
    fig = figures[-1]
    assert _labels(fig) == [f"cggm{DOT}strong", f"cggm{DOT}weak", f"cggm{DOT}L_gm"]  # joint records nothing
    assert "moving average over 10 training steps" in fig._suptitle.get_text()
    assert not any("run" in label.split(DOT)[0] for label in _labels(fig))


def test_sweep_figure_labels_and_legend():
    from cggm.commands import sweep_figure

    rows = [{"imbalance": x, "method": m, "seed": 0, "accuracy": 0.5, "weak_probe": 0.4, "weak_drop": 0.1}
            for x in (0.0, 3.0) for m in ("joint", "cggm")]
    fig = sweep_figure({"imbalances": [0.0, 3.0], "methods": ["joint", "cggm"], "seeds": [0], "epochs": 1,
                        "rows": rows})
    assert all(ax.get_ylabel() and "imbalance" in ax.get_xlabel() for ax in fig.axes)
    assert "probe" in fig.axes[0].get_ylabel() and "lost" in fig.axes[1].get_ylabel()
    assert all(ax.get_legend() is None for ax in fig.axes) and _labels(fig) == ["joint", "cggm"]
    title = fig._suptitle.get_text()
    assert "1 seed," in title and "1 epoch each" in title and "no smoothing" in title
    plots._plt().close("all")
