"""What the command line does with runs (``cggm plot``, ``cggm sweep``, ``cggm diagnose``): plots of a
run's records, the imbalance sweep, and ``diagnose``. Above the report and the runner, whose runs it
reads and makes (it was ``cggm.diagnostics.runs``; the diagnostics package holds the analyses).

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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .diagnostics.plots import _plt, plot_records, save_figure

PREFIXES = ("eps/", "B/", "cos/", "L_gm")


# -- plots of saved runs ----------------------------------------------------------------------------
def _train_dir_method(run_dir: Path) -> str:
    """The method of a ``cggm train`` output dir, from its config.yaml ("run" if unknown)."""
    import re

    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        match = re.search(r"^method:\s*\n\s+name:\s*['\"]?([\w.\-\[\]]+)", cfg.read_text(), flags=re.M)
        if match:
            return match.group(1)
    return "run"


def _metric_label(metric_keys) -> str:
    """The auxiliary classifiers' metric (eps), told from a run's metric names."""
    keys = " ".join(metric_keys)
    if "dice" in keys:
        return "mean Dice"
    if "mae" in keys:
        return "-MAE (or sign accuracy)"
    return "accuracy" if "accuracy" in keys else "metric"


def _load_run_records(run_dir: Path) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{group: {label: records}}``: one group for a train dir (labelled by its method), one per
    dataset for a bench dir (labelled by method). ``group`` also maps ``"__metric__"`` to the
    classifiers' metric name, where the run says."""
    groups: dict[str, dict[str, Any]] = {}
    name = run_dir.resolve().name or "run"
    if (run_dir / "result.json").is_file() or (run_dir / "records.json").is_file():
        method = _train_dir_method(run_dir)
        if (run_dir / "result.json").is_file():
            res = json.loads((run_dir / "result.json").read_text())
            groups[name] = {method: res.get("records", {}), "__metric__": _metric_label(res.get("val", {}))}
        if (run_dir / "records.json").is_file():
            groups.setdefault(name, {})[method] = json.loads((run_dir / "records.json").read_text())
    rec_root = run_dir / "records" if (run_dir / "records").is_dir() else None
    if rec_root is not None:
        for ds in sorted(p for p in rec_root.iterdir() if p.is_dir()):
            for f in sorted(ds.glob("*.json")):
                run = json.loads(f.read_text())
                groups.setdefault(ds.name, {})[f.stem] = run.get("records", {})
                if run.get("history"):
                    groups[ds.name]["__metric__"] = _metric_label(run["history"][0])
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
        metric = runs.pop("__metric__", "metric")
        runs = {k: v for k, v in runs.items() if (methods is None or k in methods)
                and any(key.startswith(p) for key in v for p in PREFIXES)}
        if not runs:
            continue
        paths.append(plot_records(runs, out_dir / f"records_{group}.png", prefixes=PREFIXES, window=window,
                                  metric=metric, title=f"{group}: what each method measured and applied, per step"))
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
    from .config import default_config
    from .data.registry import load_dataset
    from .report import run_one

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = default_config()
    cfg["train"] = {"epochs": int(epochs), "batch_size": 64, "lr": 1e-3}
    rows, bayes = [], []
    for imb in imbalances:
        data = load_dataset("synthetic", **{**(dataset_options or {}), "imbalance": float(imb)})
        weak = data.info["weak_modalities"][0]
        ceiling = data.bayes_optimal("test")  # exact, from the generator (cggm.data.synthetic)
        bayes.append({"fused": ceiling["fused"], "strong": ceiling[data.info["strong_modality"]],
                      "weak": ceiling[weak]})
        log(f"  imbalance {imb:<5} Bayes-optimal test accuracy: fused {bayes[-1]['fused']:.4f}, strong "
            f"{bayes[-1]['strong']:.4f}, {weak} {bayes[-1]['weak']:.4f}")
        for name in methods:
            for seed in seeds:
                r = run_one(cfg, data, name, name, {}, seed)
                rows.append({"imbalance": float(imb), "method": name, "seed": int(seed), "accuracy": r["test"],
                             "weak_probe": r["probe"][weak], "weak_drop": r["drop"][weak],
                             "strong_probe": r["probe"][data.info["strong_modality"]]})
                log(f"  imbalance {imb:<5} {name:<14} seed {seed}: acc {r['test']:.4f}  probe({weak}) "
                    f"{r['probe'][weak]:.4f}  drop({weak}) {r['drop'][weak]:+.4f}")
    result = {"imbalances": [float(i) for i in imbalances], "methods": list(methods), "seeds": list(seeds),
              "epochs": epochs, "rows": rows, "bayes": bayes}
    (out / "sweep.json").write_text(json.dumps(result, indent=1))
    with (out / "sweep.csv").open("w") as f:
        f.write("imbalance,method,seed,accuracy,weak_probe,weak_drop,strong_probe\n")
        for r in rows:
            f.write(f"{r['imbalance']},{r['method']},{r['seed']},{r['accuracy']},{r['weak_probe']},{r['weak_drop']},"
                    f"{r['strong_probe']}\n")
    if "joint" in methods:
        from .diagnostics.ceiling import gap_table

        result["gap_table"] = gap_table(result)
        (out / "sweep_gap.md").write_text(result["gap_table"])
        log("\n" + result["gap_table"])
    try:
        result["png"] = str(plot_sweep(result, out / "sweep.png"))
    except ImportError as err:
        log(f"no plot: {err}")
    return result


def sweep_figure(result: dict[str, Any]):
    """The matplotlib Figure of :func:`plot_sweep` (not saved)."""
    plt = _plt()
    panels = [("weak_probe", "weak modality: how much its encoder learned",
               "linear-probe test accuracy\nof the weak encoder's features"),
              ("weak_drop", "weak modality: how much the model uses it",
               "fused test accuracy lost when the weak\ninput is replaced by its training mean"),
              ("accuracy", "fused model", "fused test accuracy")]
    bayes = result.get("bayes")  # the Bayes-optimal ceilings, one dict per imbalance (older sweeps: none)
    ceilings = {"weak_probe": ("weak", "Bayes-optimal, weak alone"), "accuracy": ("fused", "Bayes-optimal, fused"),
                "weak_drop": (None, "Bayes-optimal: fused - strong alone")}
    if bayes and "joint" in result["methods"]:
        panels.append(("gap_share", "share of joint's gap to the fused ceiling closed",
                       "(method - joint) / (Bayes - joint), fused accuracy,\npaired by seed: mean and 95% interval"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
    xs = np.asarray(result["imbalances"], dtype=float)
    methods = list(result["methods"])
    span = float(xs.max() - xs.min()) if len(xs) > 1 else 1.0
    for ax, (key, title, ylabel) in zip(axes[0], panels):
        if key == "gap_share":
            from .diagnostics.ceiling import plot_gap_shares

            plot_gap_shares(ax, result, xs, span)
        elif bayes:
            which, label = ceilings[key]
            ys = [b[which] if which else b["fused"] - b["strong"] for b in bayes]
            ax.plot(xs, ys, "k--", linewidth=1.2, label=label)
        for i, m in enumerate(methods if key != "gap_share" else ()):
            mean, std = [], []
            for x in result["imbalances"]:
                v = [r[key] for r in result["rows"] if r["method"] == m and r["imbalance"] == x]
                mean.append(float(np.mean(v)) if v else float("nan"))
                std.append(float(np.std(v)) if v else float("nan"))
            dodge = (i - (len(methods) - 1) / 2) * 0.015 * span  # side by side, so error bars do not overlap
            ax.errorbar(xs + dodge, mean, yerr=std, marker="o", capsize=3, label=m, linewidth=1.2)
        ax.set_xlabel("imbalance knob of the synthetic data\n(0 = balanced; higher = strong modality faster)")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:  # the ceilings' lines, once each
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), 5),
               fontsize=8, frameon=True)
    seeds, epochs = len(result["seeds"]), result["epochs"]
    fig.suptitle(f"imbalance sweep: mean \u00b1 std over {seeds} seed{'s' * (seeds != 1)}, {epochs} "
                 f"epoch{'s' * (epochs != 1)} each\n(no smoothing; methods drawn side by side at each value)",
                 fontsize=11)
    return fig


def plot_sweep(result: dict[str, Any], path: str | Path) -> Path:
    """Write :func:`sweep_figure` to ``path``."""
    return save_figure(sweep_figure(result), path)


# -- diagnose a trained model -----------------------------------------------------------------------
RAW_PROBE_MAX = 4096  # values per input a memory-mapped split's raw probe reads without averaging


def raw_probes(data) -> dict[str, float]:
    """A linear probe on each modality's raw (flattened, standardised) input: how much of the label
    is linearly readable from the modality before any training; a reference for the encoders.

    In-memory splits are probed on their flattened inputs. Memory-mapped splits (audio-visual
    clips, Food-101 features) are read by batches, and an input of more than ``RAW_PROBE_MAX``
    values is averaged first (:func:`_coarse`), so that the probe fits in memory."""
    from .data.stream import split_batches, split_targets
    from .diagnostics.probe import linear_probe

    def features(ds) -> dict[str, torch.Tensor]:
        inputs = getattr(ds, "inputs", None)
        if isinstance(inputs, Mapping):
            return {m: inputs[m].float().flatten(1) for m in data.modalities}
        parts: dict[str, list[torch.Tensor]] = {m: [] for m in data.modalities}
        for x, masks, _ in split_batches(ds):
            for m in parts:
                parts[m].append(_coarse(x[m].float(), masks.get(m)))
        return {m: torch.cat(v) for m, v in parts.items()}

    tr, te = features(data.train), features(data.test)
    ytr, yte = split_targets(data.train), split_targets(data.test)
    return {m: linear_probe(tr[m], ytr, te[m], yte, data.task) for m in data.modalities}


def _coarse(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, D]`` from a batch ``[B, *shape]``: flattened if it has at most ``RAW_PROBE_MAX`` values
    per sample; else a sequence ``[B, T, D]`` averaged over its (unmasked) positions, and a map
    ``[B, ..., H, W]`` averaged to at most 8 x 8 cells and over its axes before the channels (frames)."""
    if x[0].numel() <= RAW_PROBE_MAX:
        return x.flatten(1)
    if x.ndim == 3:
        w = torch.ones(x.shape[:2]) if mask is None else mask.float()
        return (x * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
    lead = x.shape[:-2]
    cells = torch.nn.functional.adaptive_avg_pool2d(x.reshape(-1, 1, *x.shape[-2:]), (min(8, x.shape[-2]),
                                                                                      min(8, x.shape[-1])))
    cells = cells.reshape(*lead, -1)
    if cells.ndim > 3:  # [B, frames, ..., C, cells]: the frames averaged
        cells = cells.flatten(1, -3).mean(1)
    return cells.flatten(1)


def _diagnosed_config(run_dir: Path, data_path: str | None, overrides: Sequence[str]):
    """The run's config (with the data path and overrides applied) and its data, checked."""
    from .config import apply_override, load_config, validate
    from .data.base import DataError
    from .runner import load_data

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
    if not data.task.probes:  # (a linear probe cannot read feature maps)
        raise DataError(f"diagnose supports classification and regression, not {data.task.kind}.")
    return cfg, data


def _diagnosed_model(run_dir: Path, cfg: dict[str, Any], data, device: str):
    """The run's model loaded from ``best.pt`` (refused when it is not the config's run) on
    ``device``, and its method bound to it with its saved state where it loads."""
    from .methods.registry import build_method
    from .models.factory import build_model
    from .runner import settings_fingerprint
    from .training.checkpoint import CheckpointError, load_checkpoint, settings_changes

    model = build_model(cfg["model"]["arch"], data.input_shapes, data.task, **cfg["model"].get("options", {}))
    state = load_checkpoint(run_dir / "best.pt")
    # a folder whose config.yaml and best.pt come from two runs would describe one run's model
    # under the other's name: refused
    have = state.get("fingerprint") or {}
    want = {"method": cfg["method"]["name"], "arch": cfg["model"]["arch"],
            **{k: v for k, v in settings_fingerprint(cfg).items() if k != "dataset.options"}}
    changes = settings_changes(have, {k: v for k, v in want.items() if k in have})
    if changes:
        raise CheckpointError(
            f"{run_dir} mixes two runs: its config.yaml and best.pt disagree ({'; '.join(changes[:4])}: best.pt's "
            f"value -> config.yaml's). Diagnose the folder of one run: retrain it with `cggm train --output DIR`, "
            f"or put back the files of one run (`cggm train --no-resume` moves an earlier run to DIR/previous-*).")
    model.load_state_dict(state["model"])
    model.to(device)
    method = build_method(cfg["method"]["name"], **cfg["method"].get("options", {})).bind(model, data.task,
                                                                                          data.modalities)
    if state.get("method"):
        try:
            method.load_state_dict(state["method"])
        except (KeyError, RuntimeError, ValueError):
            pass  # evaluation of most methods does not depend on their training state
    return model, method


def diagnose(run_dir: str | Path, data_path: str | None = None, device: str = "cpu",
             overrides: Sequence[str] = (), shapley_masking: str | None = "mean",
             shapley_split: str = "val") -> dict[str, Any]:
    """Load ``best.pt`` + ``config.yaml`` of a ``cggm train`` output dir, rebuild its data, and
    measure each modality's utilization. Returns the numbers and a text report (``text``).

    ``shapley_masking``: also each modality's Shapley contribution to the fused metric on
    ``shapley_split`` (:func:`cggm.diagnostics.shapley.shapley_contributions` with that masking;
    ``None``: not computed)."""
    from .diagnostics.probe import probe_encoders
    from .report import removal_drops

    run_dir = Path(run_dir)
    cfg, data = _diagnosed_config(run_dir, data_path, overrides)
    model, method = _diagnosed_model(run_dir, cfg, data, device)
    metric = data.task.headline.name
    with torch.no_grad():
        full, drops = removal_drops(model, method, data, metric)
    probes = probe_encoders(model, data.train, data.test, data.task)
    raw = raw_probes(data)
    out = {"run_dir": str(run_dir), "dataset": data.name, "method": cfg["method"]["name"], "metric": metric,
           "fused": full, "drop": drops, "probe": probes, "raw_probe": raw}
    out["verdict"], out["text"] = _interpret(out, data)
    if shapley_masking:
        out["shapley"], text = _shapley(model, method, data, shapley_masking, shapley_split)
        out["text"] += "\n\n" + text
    if not isinstance(getattr(data.train, "inputs", None), Mapping):
        out["text"] += (f"\n(Memory-mapped data: raw-input probes of inputs with more than {RAW_PROBE_MAX} values "
                        f"read them averaged: sequences over positions, images and spectrograms to 8 x 8 cells.)")
    return out


def _shapley(model, method, data, masking: str, split: str) -> tuple[dict[str, Any] | None, str]:
    """Each modality's Shapley contribution (JSON-able, or None beyond the exact limit) and its text."""
    from .diagnostics.shapley import MAX_MODALITIES, shapley_contributions

    if len(data.modalities) > MAX_MODALITIES:
        return None, (f"(No Shapley contributions: {len(data.modalities)} modalities, more than the "
                      f"{MAX_MODALITIES} valued exactly.)")
    res = shapley_contributions(model, method, data, split=split, masking=masking)
    hidden = {"mean": "its input replaced by the training mean", "zero": "its input set to zero",
              "features": "its feature zeroed before the fused head"}[masking]
    lines = [res.table(), "",
             (f"- phi: the modality's Shapley contribution to the fused {split} {res.metric}: what adding it "
              f"changes, v(S + it) - v(S), averaged over every order of adding the modalities; a modality absent "
              f"from a coalition S has {hidden}. The phis add up to v(all) - v(empty) (2^M evaluations, exact). "
              "share = phi / sum of phis. Unlike the drop (all others present), it credits a modality for what "
              "it adds in every company, so two modalities that carry the same information share the credit.")]
    return res.to_dict(), "\n".join(lines)


def _interpret(d: dict[str, Any], data) -> tuple[dict[str, str], str]:
    metric, drops, probes, raw = d["metric"], d["drop"], d["probe"], d["raw_probe"]
    chance = data.task.chance
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
    from .diagnostics.ceiling import bayes_ceiling

    ceiling = bayes_ceiling(data) if metric == "accuracy" else None
    if ceiling:  # data that knows its Bayes-optimal accuracy (the synthetic benchmark)
        lines += ["", "Distance to the Bayes-optimal ceiling (exact, from the data's generator, on this test split):",
                  f"- fused: {d['fused']:.4f} vs {ceiling['fused']:.4f} ({d['fused'] - ceiling['fused']:+.4f})"]
        lines += [f"- {m} encoder probe: {probes[m]:.4f} vs {m} alone {ceiling[m]:.4f} ({probes[m] - ceiling[m]:+.4f})"
                  for m in data.modalities if m in ceiling]
        d["bayes"] = ceiling
    under = [m for m, v in verdict.items() if v in ("under-used", "under-trained encoder")]
    lines.append("")
    lines.append("Verdict: " + (f"the model under-uses {', '.join(under)}." if under else
                                "no modality looks under-used by these measures."))
    return verdict, "\n".join(lines)
