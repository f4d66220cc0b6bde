"""Plots of what a run did (matplotlib, from the ``plots`` extra)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

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


def plot_records(runs: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path,
                 prefixes: Sequence[str] = ("eps/", "B/", "cos/", "L_gm"), window: int = 25,
                 title: str | None = None) -> Path:
    """One panel per record family (classifier metric, B, cosines, L_gm); one line per
    (run, modality). ``runs`` maps a run label to its per-step records."""
    plt = _plt()
    present = [p for p in prefixes if any(k.startswith(p) for r in runs.values() for k in r)]
    if not present:
        raise ValueError(f"No records with prefixes {list(prefixes)} to plot; runs have "
                         f"{sorted({k for r in runs.values() for k in r})}.")
    titles = {"eps/": "classifier metric (epsilon)", "B/": "magnitude factor B", "cos/": "cos(g_F, g_i)",
              "L_gm": "L_gm"}
    fig, axes = plt.subplots(1, len(present), figsize=(4.6 * len(present), 3.6), squeeze=False)
    for ax, prefix in zip(axes[0], present):
        for label, rec in runs.items():
            for key in sorted(k for k in rec if k.startswith(prefix)):
                name = key[len(prefix):] if prefix.endswith("/") else ""
                ax.plot(smooth(rec[key], window), label=f"{label} {name}".strip(), linewidth=1.2)
        ax.set_title(titles.get(prefix, prefix))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (creating the folder) and close a figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path
