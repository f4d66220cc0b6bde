"""Plots of what a run did (matplotlib, from the ``plots`` extra)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._optional import require


def _plt():
    mpl = require("matplotlib", "plots", "Plotting")
    mpl.use("Agg")
    return require("matplotlib.pyplot", "plots", "Plotting")


def smooth(values: Sequence[float], window: int = 25) -> np.ndarray:
    """Trailing moving average (so the first points are not dropped)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0 or window <= 1:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = np.empty_like(v)
    for i in range(v.size):
        lo = max(0, i + 1 - window)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


# prefix -> (panel title, y-axis label); "{metric}" is the classifiers' metric (accuracy for classification)
PANELS = {
    "eps/": ("auxiliary classifier per modality", "classifier {metric} eps\n(on the training batch; higher is better)"),
    "B/": ("magnitude factor B per modality", "magnitude factor B\n(multiplies that encoder's step)"),
    "cos/": ("direction: cos(g_F, g_i)", "cosine of the fused and the\nclassifier's head gradients (-1 to 1)"),
    "L_gm": ("gradient-modulation loss", "L_gm\n(added to the loss as lam * L_gm)"),
}
LINESTYLES = ("-", "--", ":", "-.")
SEP = " \u00b7 "  # "<method> · <modality>"


def smoothing_caption(window: int) -> str:
    """What the lines show, for a figure's title."""
    if window <= 1:
        return "lines: raw per-step values (no smoothing)"
    return f"lines: trailing moving average over {window} training steps"


def records_figure(runs: Mapping[str, Mapping[str, Sequence[float]]],
                   prefixes: Sequence[str] = ("eps/", "B/", "cos/", "L_gm"), window: int = 25,
                   title: str | None = None, metric: str = "metric", note: str | None = None):
    """The matplotlib Figure of :func:`plot_records` (not saved): one panel per record family
    (classifier metric, B, cosines, L_gm), one line per (run, modality), labelled ``"<run> ·
    <modality>"``. A modality keeps its colour and a run its line style in every panel; one legend
    for all panels sits below them. A panel whose values reach beyond +-50 (the paper rule's B can)
    gets a symmetric-log y axis, so that bounded runs stay readable next to it."""
    plt = _plt()
    present = [p for p in prefixes if any(k.startswith(p) for r in runs.values() for k in r)]
    if not present:
        raise ValueError(f"No records with prefixes {list(prefixes)} to plot; runs have "
                         f"{sorted({k for r in runs.values() for k in r})}.")
    modalities = sorted({k[len(p):] for r in runs.values() for k in r for p in present if p.endswith("/")
                         and k.startswith(p)})
    colors = {m: f"C{i % 10}" for i, m in enumerate(modalities)}
    styles = {label: LINESTYLES[i % len(LINESTYLES)] for i, label in enumerate(runs)}
    markers = {label: (None if i < len(LINESTYLES) else "os^vD"[(i // len(LINESTYLES) - 1) % 5])
               for i, label in enumerate(runs)}
    fig, axes = plt.subplots(1, len(present), figsize=(4.8 * len(present), 3.8), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, prefix in zip(axes[0], present):
        peak = 0.0
        for label, rec in runs.items():
            for key in sorted(k for k in rec if k.startswith(prefix)):
                name = key[len(prefix):] if prefix.endswith("/") else key
                values = smooth(rec[key], window)
                finite = values[np.isfinite(values)]
                peak = max(peak, float(np.abs(finite).max()) if finite.size else 0.0)
                (line,) = ax.plot(values, color=colors.get(name, "0.25"), linestyle=styles[label], linewidth=1.3,
                                  marker=markers[label], markevery=max(1, len(values) // 8), markersize=4)
                handles.setdefault(f"{label}{SEP}{name}", line)
        panel_title, ylabel = PANELS.get(prefix, (prefix, prefix))
        if peak > 50:
            _symlog(ax, peak)
            ylabel += "\n[symlog scale: linear in (-1, 1)]"
        ax.set_title(panel_title, fontsize=10)
        ax.set_ylabel(ylabel.format(metric=metric), fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    ncol = max(1, min(len(handles), len(modalities) + ("L_gm" in present), 4))
    fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol,
               fontsize=8, frameon=True)
    caption = smoothing_caption(window) + (f"; {note}" if note else "")
    fig.suptitle(f"{title}\n{caption}" if title else caption, fontsize=11)
    return fig


def _symlog(ax, peak: float) -> None:
    """A symmetric-log y axis with a few round ticks (0 and every few decades up to ``peak``)."""
    ax.set_yscale("symlog", linthresh=1.0)
    top = int(np.ceil(np.log10(peak)))
    step = max(1, int(np.ceil(top / 3)))
    decades = [10.0 ** k for k in range(step, top + 1, step)]
    low, high = ax.get_ylim()
    ticks = [0.0] + [d for d in decades if d <= high * 10] + [-d for d in decades if -d >= low * 10]
    ax.set_yticks(sorted(ticks))


def plot_records(runs: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path,
                 prefixes: Sequence[str] = ("eps/", "B/", "cos/", "L_gm"), window: int = 25,
                 title: str | None = None, metric: str = "metric", note: str | None = None) -> Path:
    """Write :func:`records_figure` to ``path``. ``runs`` maps a run label (the method) to its
    per-step records."""
    return save_figure(records_figure(runs, prefixes, window=window, title=title, metric=metric, note=note), path)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (creating the folder) and close a figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight" keeps a legend placed outside the axes
    _plt().close(fig)
    return path
