"""Diagnostics from saved runs: plots of a run's records, the imbalance sweep, and ``diagnose``.

* :func:`plot_run` — each modality's classifier metric, B, the cosines and L_gm over training,
  from a ``cggm train`` output dir (``result.json``) or a ``cggm bench --report`` dir
  (``records/<dataset>/<method>.json``), one PNG per dataset.
* :func:`run_sweep` / :func:`plot_sweep` — the synthetic imbalance knob on the x axis; the weak
  modality's utilization (linear probe of its encoder, and the fused accuracy lost without it)
  and the fused accuracy on the y axis; one line per method (mean ± std over seeds).
* :func:`diagnose` — whether a trained model under-uses a modality, with the numbers and what
  they mean.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .plots import _plt, plot_records, save_figure

PREFIXES = ("eps/", "B/", "cos/", "L_gm")


# -- plots of saved runs ----------------------------------------------------------------------------
def _load_run_records(run_dir: Path) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{group: {label: records}}``: one group for a train dir, one per dataset for a bench dir."""
    groups: dict[str, dict[str, dict[str, list[float]]]] = {}
    if (run_dir / "result.json").is_file():
        res = json.loads((run_dir / "result.json").read_text())
        groups[run_dir.name or "run"] = {"run": res.get("records", {})}
    if (run_dir / "records.json").is_file():
        groups.setdefault(run_dir.name or "run", {})["run"] = json.loads((run_dir / "records.json").read_text())
    rec_root = run_dir / "records" if (run_dir / "records").is_dir() else None
    if rec_root is not None:
        for ds in sorted(p for p in rec_root.iterdir() if p.is_dir()):
            for f in sorted(ds.glob("*.json")):
                groups.setdefault(ds.name, {})[f.stem] = json.loads(f.read_text()).get("records", {})
    return groups


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, window: int = 25,
             methods: Sequence[str] | None = None) -> list[Path]:
    """PNG(s) of the per-step records of a run dir (see the module docstring). Methods without
    any of these records (e.g. joint) are left out of the plot."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a directory (expected a `cggm train` or `cggm bench --report` "
                                f"output).")
    groups = _load_run_records(run_dir)
    if not groups:
        raise FileNotFoundError(f"{run_dir} has no result.json, records.json or records/ folder to plot.")
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    paths = []
    for group, runs in groups.items():
        runs = {k: v for k, v in runs.items() if (methods is None or k in methods)
                and any(key.startswith(p) for key in v for p in PREFIXES)}
        if not runs:
            continue
        paths.append(plot_records(runs, out_dir / f"records_{group}.png", prefixes=PREFIXES, window=window,
                                  title=f"{group}: per-modality classifier metric, B, cos(g_F, g_i), L_gm"))
    if not paths:
        raise ValueError(f"No run in {run_dir} has records {list(PREFIXES)} (joint training records none; "
                         f"train with a CGGM method to get them).")
    return paths


# -- imbalance sweep --------------------------------------------------------------------------------
def run_sweep(imbalances: Sequence[float], methods: Sequence[str], seeds: Sequence[int], epochs: int = 10,
              out_dir: str | Path = "sweep_output", log: Callable[[str], None] = print,
              dataset_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train every method x seed on ``synthetic`` at each imbalance; write ``sweep.json``,
    ``sweep.csv`` and ``sweep.png`` (if matplotlib is installed) to ``out_dir``."""
    from ..config import default_config
    from ..data.registry import load_dataset
    from ..report import run_one

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = default_config()
    cfg["train"] = {"epochs": int(epochs), "batch_size": 64, "lr": 1e-3}
    rows = []
    for imb in imbalances:
        data = load_dataset("synthetic", **{**(dataset_options or {}), "imbalance": float(imb)})
        weak = data.info["weak_modalities"][0]
        for name in methods:
            for seed in seeds:
                r = run_one(cfg, data, name, name, {}, seed)
                rows.append({"imbalance": float(imb), "method": name, "seed": int(seed), "accuracy": r["test"],
                             "weak_probe": r["probe"][weak], "weak_drop": r["drop"][weak],
                             "strong_probe": r["probe"][data.info["strong_modality"]]})
                log(f"  imbalance {imb:<5} {name:<14} seed {seed}: acc {r['test']:.4f}  probe({weak}) "
                    f"{r['probe'][weak]:.4f}  drop({weak}) {r['drop'][weak]:+.4f}")
    result = {"imbalances": [float(i) for i in imbalances], "methods": list(methods), "seeds": list(seeds),
              "epochs": epochs, "rows": rows}
    (out / "sweep.json").write_text(json.dumps(result, indent=1))
    with (out / "sweep.csv").open("w") as f:
        f.write("imbalance,method,seed,accuracy,weak_probe,weak_drop,strong_probe\n")
        for r in rows:
            f.write(f"{r['imbalance']},{r['method']},{r['seed']},{r['accuracy']},{r['weak_probe']},{r['weak_drop']},"
                    f"{r['strong_probe']}\n")
    try:
        result["png"] = str(plot_sweep(result, out / "sweep.png"))
    except ImportError as err:
        log(f"no plot: {err}")
    return result


def plot_sweep(result: dict[str, Any], path: str | Path) -> Path:
    plt = _plt()
    panels = [("weak_probe", "weak modality: encoder probe accuracy"),
              ("weak_drop", "weak modality: accuracy lost without it"), ("accuracy", "fused test accuracy")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    xs = result["imbalances"]
    for ax, (key, title) in zip(axes[0], panels):
        for m in result["methods"]:
            mean, std = [], []
            for x in xs:
                v = [r[key] for r in result["rows"] if r["method"] == m and r["imbalance"] == x]
                mean.append(float(np.mean(v)) if v else float("nan"))
                std.append(float(np.std(v)) if v else float("nan"))
            ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=m, linewidth=1.2)
        ax.set_xlabel("imbalance (synthetic knob)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"imbalance sweep ({len(result['seeds'])} seeds, {result['epochs']} epochs; mean ± std)")
    return save_figure(fig, path)


# -- diagnose a trained model -----------------------------------------------------------------------
def raw_probes(data) -> dict[str, float]:
    """A linear probe on each modality's raw (flattened, standardised) input: how much of the label
    is linearly readable from the modality before any training; a reference for the encoders."""
    from .probe import linear_probe

    return {m: linear_probe(data.train.inputs[m].float().flatten(1), data.train.target,
                            data.test.inputs[m].float().flatten(1), data.test.target, data.task)
            for m in data.modalities}


def diagnose(run_dir: str | Path, data_path: str | None = None, device: str = "cpu",
             overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Load ``best.pt`` + ``config.yaml`` of a ``cggm train`` output dir, rebuild its data, and
    measure each modality's utilization. Returns the numbers and a text report (``text``)."""
    from ..config import apply_override, load_config, validate
    from ..data.base import DataError
    from ..methods.registry import build_method
    from ..models.factory import build_model
    from ..report import HEADLINE, removal_drops
    from ..runner import load_data
    from ..training.checkpoint import load_checkpoint
    from .probe import probe_encoders

    run_dir = Path(run_dir)
    for f in ("config.yaml", "best.pt"):
        if not (run_dir / f).is_file():
            raise FileNotFoundError(f"{run_dir / f} not found: `cggm diagnose` needs the output dir of `cggm train "
                                    f"--output DIR` (it holds config.yaml and best.pt).")
    cfg = load_config(run_dir / "config.yaml")
    if data_path:
        cfg = apply_override(cfg, f"dataset.options.path={json.dumps(str(data_path))}")
    for o in overrides:
        cfg = apply_override(cfg, o)
    validate(cfg)
    data = load_data(cfg)
    if data.task.kind == "segmentation":  # (a linear probe cannot read feature maps)
        raise DataError(f"diagnose supports classification and regression, not {data.task.kind}.")
    model = build_model(cfg["model"]["arch"], data.input_shapes, data.task, **cfg["model"].get("options", {}))
    state = load_checkpoint(run_dir / "best.pt")
    model.load_state_dict(state["model"])
    model.to(device)
    method = build_method(cfg["method"]["name"], **cfg["method"].get("options", {})).bind(model, data.task,
                                                                                          data.modalities)
    if state.get("method"):
        try:
            method.load_state_dict(state["method"])
        except (KeyError, RuntimeError, ValueError):
            pass  # evaluation of most methods does not depend on their training state
    metric, _mode = HEADLINE[data.task.kind]
    with torch.no_grad():
        full, drops = removal_drops(model, method, data, metric)
    probes = probe_encoders(model, data.train, data.test, data.task)
    raw = raw_probes(data)
    out = {"run_dir": str(run_dir), "dataset": data.name, "method": cfg["method"]["name"], "metric": metric,
           "fused": full, "drop": drops, "probe": probes, "raw_probe": raw}
    out["verdict"], out["text"] = _interpret(out, data)
    return out


def _interpret(d: dict[str, Any], data) -> tuple[dict[str, str], str]:
    metric, drops, probes, raw = d["metric"], d["drop"], d["probe"], d["raw_probe"]
    chance = 1.0 / data.task.num_outputs if data.task.kind == "classification" else float("nan")
    top = max(drops.values()) if drops else 0.0
    verdict: dict[str, str] = {}
    lines = [f"diagnose {d['run_dir']} ({d['dataset']}, method {d['method']})",
             f"fused test {metric}: {d['fused']:.4f}" + (f" (chance {chance:.3f})" if not math.isnan(chance) else ""), "",
             f"{'modality':<16}{'drop w/o it':>12}{'encoder probe':>15}{'raw-input probe':>17}   reading"]
    for m in data.modalities:
        informative = math.isnan(chance) or max(probes[m], raw[m]) > chance + 0.05
        lost = raw[m] - probes[m]
        if informative and top > 0 and drops[m] < 0.2 * top and drops[m] < 0.02:
            verdict[m] = "under-used"
            why = "the model barely changes without it although it carries label information"
        elif informative and lost > 0.03:
            verdict[m] = "under-trained encoder"
            why = f"its encoder keeps {lost:.3f} less linearly decodable accuracy than its raw input"
        elif not informative:
            verdict[m] = "uninformative"
            why = "neither its raw input nor its encoder predicts the label much above chance"
        else:
            verdict[m] = "used"
            why = "the model relies on it and its encoder keeps what its input offers"
        lines.append(f"{m:<16}{drops[m]:>+12.4f}{probes[m]:>15.4f}{raw[m]:>17.4f}   {verdict[m]}: {why}")
    lines += ["", "How to read this:",
              (f"- drop w/o it: fused {metric} lost when that modality's input is replaced by its training mean at "
              "test time. Large = the prediction depends on it; ~0 = the model ignores it."),
              ("- encoder probe: a linear classifier on that modality's frozen encoder features (train split -> "
              "test). It says what the encoder learned, whatever the fusion head does with it."),
              ("- raw-input probe: the same linear classifier on the raw input; a reference for what is linearly "
              "available. An encoder probe well below it means the encoder was under-trained (typical of a "
              "modality starved by a dominant one); a non-linear modality can legitimately exceed it."),
              ("- A modality that is informative but has a small drop is under-used by the fused model: balancing "
              "methods (CGGM, OGM-GE, ...) aim to raise its drop and probe. A reference run with `--method "
              "unimodal --set method.options.modality=NAME` says how far it can go alone.")]
    under = [m for m, v in verdict.items() if v in ("under-used", "under-trained encoder")]
    lines.append("")
    lines.append("Verdict: " + (f"the model under-uses {', '.join(under)}." if under else
                                "no modality looks under-used by these measures."))
    return verdict, "\n".join(lines)
