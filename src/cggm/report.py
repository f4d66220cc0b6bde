"""Benchmark reports: datasets x methods x seeds, with utilization diagnostics, as Markdown + CSV.

For every run (one dataset, one method, one seed, the same model and budget) it records:

* the test metric of the checkpoint selected on validation, per task (:data:`HEADLINE`):
  ``accuracy`` for classification, ``mae`` for regression, ``dice_mean`` (mean Dice over the
  foreground classes) for segmentation;
* **probe**: a linear probe of each modality's encoder (fitted on frozen training features,
  scored on test; :func:`cggm.diagnostics.probe.probe_encoders`). It measures what the encoder
  learned, whatever the head does with it. Segmentation features are maps, not vectors: they are
  not probed (NaN, shown as —);
* **removal drop**: the fused test metric minus the metric when one modality's input is replaced
  by its *training mean* at test time (every sample gets the mean input; with standardised
  features that is ~0). A large drop means the model relies on that modality; ~0 means it ignores
  it. The replacement goes through the method's own evaluation path (``prepare_eval`` /
  ``eval_prediction``), so methods that predict differently at test time are scored as they are;
* **Shapley contribution** of each modality to the fused *validation* metric
  (:func:`cggm.diagnostics.shapley.shapley_contributions`, absent modalities' inputs replaced by
  their training mean, 2^M evaluations; not computed beyond 10 modalities), with the values of the
  empty and the full coalition;
* seconds per training epoch (the engine's timing), reported relative to joint training;
* summaries of the method's per-step records (e.g. CGGM's classifier metric ``eps/<m>``, the
  magnitude factor ``B/<m>``, the cosines ``cos/<m>`` and ``L_gm``): mean over training and over
  the last epoch.

Per (dataset, method) it summarises over seeds: mean, std and the 95% t-interval; the difference
to joint training paired by seed (same seed = same initial weights and batch order), with its
95% t-interval. ``unimodal`` is expanded into one run per modality (``unimodal[m]``): its accuracy
is what that modality alone reaches with this model and budget.

Method options are per method (:func:`cggm.runner.comparison_options`): the configured method and
its variants run with the configured options they take, every other method with its own defaults.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import train_config
from .data.base import BatchIterator, DataSplits
from .data.registry import load_dataset
from .data.stream import input_means
from .diagnostics.probe import probe_encoders
from .diagnostics.shapley import MAX_MODALITIES, shapley_contributions
from .methods.base import UnsupportedSettingError
from .runner import BenchmarkError, build_trainer, comparison_options, previous_benchmark, run_failure, summarize
from .training.evaluation import evaluate, replace_inputs
from .types import KINDS

#: the metric a report shows per task kind, and ``max`` (higher is better) or ``min``: the task's
#: headline (:attr:`cggm.types.Task.headline`), kept as a table for readers of this module
HEADLINE = {kind: (spec.headline.name, spec.headline.mode) for kind, spec in KINDS.items()}


# -- one run ----------------------------------------------------------------------------------------
def train_one(cfg: dict[str, Any], data: DataSplits, method: str, options: dict | None, seed: int,
              output_dir: str | Path | None = None):
    """Train one run with :func:`cggm.runner.build_trainer`, keeping the bound method (its
    evaluation path is needed for the removal test). Returns ``(result, model, method)``."""
    run_cfg = {**cfg, "method": {"name": method, "options": dict(options or {})},
               "train": {**(cfg.get("train") or {}), "seed": int(seed)}}
    trainer = build_trainer(run_cfg, data, output_dir=output_dir, resume=False, progress=False)
    result = trainer.fit()
    return result, trainer.model, trainer.method


def evaluate_with(model, method, data: DataSplits, split: str = "test", fill: dict[str, torch.Tensor] | None = None,
                  batch_size: int = 512) -> dict[str, float]:
    """Metrics of ``model`` on a split through ``method``'s evaluation path, with the inputs of the
    modalities in ``fill`` replaced by the given per-sample tensor (broadcast to every sample).

    The engine's evaluation (:func:`cggm.training.evaluation.evaluate`): a split with its own
    ``evaluate`` protocol (BraTS volumes) is scored by it, the replacement passed on as its
    ``transform``. Evaluated in this process alone (not sharded across DDP ranks)."""
    device = next(model.parameters()).device
    return evaluate(model, method, getattr(data, split), data.task, device, batch_size,
                    transform=replace_inputs(fill) if fill else None, shard=False)


def removal_drops(model, method, data: DataSplits, metric: str | None = None) -> tuple[float, dict[str, float]]:
    """The fused test metric (default: the task's headline), and for each modality the metric lost
    when its input is replaced by its training mean (positive = the model uses it; for a
    lower-is-better metric the sign is flipped so that positive still means "worse without it")."""
    metric = metric or data.task.headline.name
    full = evaluate_with(model, method, data)[metric]
    sign = 1.0 if data.task.higher_is_better(metric) else -1.0
    drops = {}
    means = input_means(data.train, data.modalities)  # also for memory-mapped splits (audio-visual, Food-101)
    for m in data.modalities:
        drops[m] = sign * (full - evaluate_with(model, method, data, fill={m: means[m]})[metric])
    return full, drops


def record_summary(records: dict[str, list[float]], steps_per_epoch: int) -> dict[str, dict[str, float]]:
    """Mean and median of each per-step record over training, and its mean over the last epoch."""
    out = {}
    for k, v in records.items():
        a = np.asarray(v, dtype=float)
        a = a[np.isfinite(a)]
        if a.size:
            out[k] = {"mean": float(a.mean()), "median": float(np.median(a)),
                      "last": float(a[-max(1, steps_per_epoch):].mean())}
    return out


def run_one(cfg, data: DataSplits, label: str, method: str, options: dict | None, seed: int,
            keep_records: bool = False) -> dict[str, Any]:
    """One run with its diagnostics, as a JSON-able dict."""
    metric = data.task.headline.name
    result, model, bound = train_one(cfg, data, method, options, seed)
    full, drops = removal_drops(model, bound, data, metric)
    shapley = (shapley_contributions(model, bound, data, split="val", metric=metric)
               if len(data.modalities) <= MAX_MODALITIES else None)
    if not data.task.probes:  # a linear probe reads vectors; these features are maps
        probes = {m: float("nan") for m in data.modalities}
    else:
        probes = probe_encoders(model, data.train, data.test, data.task)
    if method == "unimodal":  # the other encoders only ever saw zeros: their probe means nothing
        keep = (options or {}).get("modality")
        probes = {m: (v if m == keep else float("nan")) for m, v in probes.items()}
    steps = len(BatchIterator(data.train, train_config(cfg).batch_size, True))
    run = {"dataset": data.name, "label": label, "method": method, "options": options or {}, "seed": int(seed),
           "metric": metric, "test": result.test[metric], "test_all": result.test, "removal_full": full,
           "probe": probes, "drop": drops, "seconds_per_epoch": result.seconds_per_epoch,
           "shapley": shapley.phi if shapley else {}, "shapley_empty": shapley.v_empty if shapley else None,
           "shapley_full": shapley.v_full if shapley else None,
           "best_epoch": result.best_epoch, "records": record_summary(result.records, steps)}
    if keep_records:
        run["records_full"] = result.records
        run["history"] = result.history
    return run


# -- a benchmark ------------------------------------------------------------------------------------
def method_variants(methods: Sequence[str], modalities: Sequence[str]) -> list[tuple[str, str, dict]]:
    """(label, method, options) per run kind; ``unimodal`` becomes one per modality."""
    out = []
    for name in methods:
        if name == "unimodal":
            out += [(f"unimodal[{m}]", "unimodal", {"modality": m}) for m in modalities]
        else:
            out.append((name, name, {}))
    return out


def run_benchmark(cfg: dict[str, Any], datasets: Sequence[str], methods: Sequence[str], seeds: Sequence[int],
                  dataset_options: dict[str, dict] | None = None, records_dir: str | Path | None = None,
                  log: Callable[[str], None] = print, method_options: dict[str, dict] | None = None,
                  out_dir: str | Path | None = None) -> dict[str, Any]:
    """Every dataset x method x seed with ``cfg``'s model and training budget, each method with its
    options of :func:`cggm.runner.comparison_options` (``method_options[name]`` on top).

    A method that refuses a setting (:class:`~cggm.methods.UnsupportedSettingError`, e.g. one built
    for 2 modalities on 4) is recorded as skipped with its reason, and the rest goes on. A run that
    fails otherwise is recorded in its dataset's ``"failed"`` (label, method, seed, error and
    traceback), the rest goes on, and :class:`~cggm.runner.BenchmarkError` names the failed runs
    at the end (its ``report`` holds the finished ones). ``records_dir`` receives each method's
    per-step records of the first seed (``<dataset>/<label>.json``) for :func:`cggm.diagnostics.plots`.

    With ``out_dir`` the report (:func:`write_report`) is rewritten as each run ends, so an
    interrupted benchmark keeps its finished runs; run again with the same settings and
    ``out_dir``, it keeps them (from ``bench.json``) and runs only the others (a ``bench.json`` of
    other settings is refused)."""
    t0 = time.perf_counter()
    per_method, notes = comparison_options(cfg, methods, method_options)
    for line in notes:
        log(f"options of {line}")
    out = {"config": cfg, "seeds": [int(s) for s in seeds], "methods": list(methods), "method_options": per_method,
           "datasets": []}
    kept = _kept_runs(out, out_dir)
    failed: list[dict[str, Any]] = []
    for ds in datasets:
        data, opts, entry = _dataset_entry(cfg, ds, dataset_options, log)
        t_ds = time.perf_counter()

        def written(entry=entry, t_ds=t_ds) -> None:  # the report so far, this dataset's runs included
            if out_dir is not None:
                now = {**entry, "seconds": time.perf_counter() - t_ds, "summary": summarize_dataset(entry)}
                write_report({**out, "datasets": out["datasets"] + [now], "seconds": time.perf_counter() - t0},
                             out_dir)

        for label, name, variant in method_variants(methods, data.modalities):
            options = {**per_method.get(name, {}), **variant}
            for seed in seeds:
                done = kept.get((ds, json.dumps(opts, sort_keys=True, default=float), label, int(seed)))
                if done is not None:
                    entry["runs"].append(done)
                    log(f"  {label:<22} seed {seed}: kept from {Path(out_dir) / 'bench.json'} (finished earlier; "
                        f"a new report directory runs it again)")
                    continue
                records = records_dir if seed == seeds[0] else None
                if not _bench_run(cfg, data, entry, (label, name, options, seed), records, failed, log, written):
                    break  # refused: the method's other seeds would be refused alike
        entry["seconds"] = time.perf_counter() - t_ds
        entry["summary"] = summarize_dataset(entry)
        out["datasets"].append(entry)
    out["seconds"] = time.perf_counter() - t0
    if out_dir is not None:
        write_report(out, out_dir)
    if failed:
        raise BenchmarkError(failed, out, out_dir)
    return out


def _kept_runs(out: dict[str, Any], out_dir: str | Path | None) -> dict[tuple, dict[str, Any]]:
    """The runs an earlier benchmark of the same settings finished in ``out_dir`` (none without it),
    by (dataset, its options as JSON, label, seed)."""
    previous = None
    if out_dir is not None:
        previous = previous_benchmark(Path(out_dir) / "bench.json",
                                      {k: out[k] for k in ("config", "seeds", "methods", "method_options")})
    return {(e["name"], json.dumps(e["options"], sort_keys=True, default=float), r["label"], r["seed"]): r
            for e in (previous or {}).get("datasets", []) for r in e["runs"]}


def _dataset_entry(cfg: dict[str, Any], ds: str, dataset_options: dict[str, dict] | None,
                   log: Callable[[str], None]) -> tuple[DataSplits, dict, dict[str, Any]]:
    """``(data, options, entry)``: the dataset ``ds`` loaded (with its options, those of ``cfg``
    when it is ``cfg``'s dataset and none are given) and its report entry, no run yet."""
    opts = dict((dataset_options or {}).get(ds, {}))
    if not opts and cfg.get("dataset", {}).get("name") == ds:
        opts = dict(cfg["dataset"].get("options") or {})
    data = load_dataset(ds, **opts)
    log(f"[{ds}] {data.description}")
    entry = {"name": ds, "options": opts, "description": data.description, "modalities": list(data.modalities),
             "sizes": {k: len(getattr(data, k)) for k in ("train", "val", "test")}, "runs": [], "skipped": {}}
    if hasattr(data, "bayes_optimal"):  # data that knows its ceiling (synthetic): exact, on the test split
        entry["bayes"] = data.bayes_optimal("test")
        log("  Bayes-optimal test accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in entry["bayes"].items()))
    entry["failed"] = []
    return data, opts, entry


def _bench_run(cfg, data: DataSplits, entry: dict[str, Any], run_id: tuple[str, str, dict, int],
               records_dir: str | Path | None, failed: list[dict[str, Any]], log: Callable[[str], None],
               written: Callable[[], None]) -> bool:
    """One run of the benchmark, ``run_id = (label, method, options, seed)``, into ``entry``: its
    per-step records into ``records_dir`` when given; a failure recorded (also in ``failed``) and
    logged. False when the method refused the setting (recorded as skipped)."""
    label, name, options, seed = run_id
    ds = entry["name"]
    keep = records_dir is not None
    try:
        run = run_one(cfg, data, label, name, options, seed, keep_records=keep)
    except UnsupportedSettingError as err:  # a refused setting: skipped, not failed
        entry["skipped"][label] = f"{type(err).__name__}: {err}"
        log(f"  {label:<22} skipped: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
        return False
    except Exception as err:  # recorded, named, and raised at the end: the other runs go on
        entry["failed"].append(run_failure(err, dataset=ds, label=label, method=name, seed=int(seed)))
        failed.append(entry["failed"][-1])
        log(f"  {label:<22} seed {seed}: FAILED: {entry['failed'][-1]['error'].splitlines()[0][:160]}")
        written()
        return True
    if keep:
        path = Path(records_dir) / ds / f"{label}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"label": label, "dataset": ds, "seed": seed,
                                    "records": run.pop("records_full"),
                                    "history": run.pop("history")}, default=float))
    entry["runs"].append(run)
    log(f"  {label:<22} seed {seed}: {run['metric']} {run['test']:.4f}  probe "
        + " ".join(f"{m}={v:.3f}" for m, v in run["probe"].items())
        + "  drop " + " ".join(f"{m}={v:+.3f}" for m, v in run["drop"].items())
        + f"  {run['seconds_per_epoch']:.2f}s/ep")
    written()
    return True


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


def summarize_dataset(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method label: metric summary, paired difference to joint, probes, drops, time, records."""
    runs = entry["runs"]
    labels = list(dict.fromkeys(r["label"] for r in runs))
    joint = {r["seed"]: r for r in runs if r["label"] == "joint"}
    joint_spe = np.mean([r["seconds_per_epoch"] for r in joint.values()]) if joint else float("nan")
    out = {}
    for label in labels:
        rs = [r for r in runs if r["label"] == label]
        diffs = [r["test"] - joint[r["seed"]]["test"] for r in rs if r["seed"] in joint]
        keys = sorted({k for r in rs for k in r["records"]})
        out[label] = {
            "method": rs[0]["method"], "metric": rs[0]["metric"], "n": len(rs),
            "test": summarize([r["test"] for r in rs]),
            "diff_joint": summarize(diffs) if label != "joint" and diffs else None,
            "probe": {m: summarize([_nan(r["probe"].get(m)) for r in rs]) for m in entry["modalities"]},
            "drop": {m: summarize([r["drop"][m] for r in rs]) for m in entry["modalities"]},
            "shapley": {m: summarize([_nan(r.get("shapley", {}).get(m)) for r in rs]) for m in entry["modalities"]},
            "shapley_empty": summarize([_nan(r.get("shapley_empty")) for r in rs]),
            "shapley_full": summarize([_nan(r.get("shapley_full")) for r in rs]),
            "seconds_per_epoch": float(np.mean([r["seconds_per_epoch"] for r in rs])),
            "time_vs_joint": float(np.mean([r["seconds_per_epoch"] for r in rs]) / joint_spe) if joint else float("nan"),
            "records": {k: {s: float(np.nanmean([r["records"][k].get(s, np.nan) for r in rs if k in r["records"]]))
                            for s in ("mean", "median", "last")} for k in keys},
        }
    return out


# -- writing ----------------------------------------------------------------------------------------
def _f(x: float, nd: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _pm(s: dict | None, nd: int = 3) -> str:
    if not s or s["n"] == 0 or math.isnan(s["mean"]):
        return "—"
    return f"{s['mean']:.{nd}f} ± {s['std']:.{nd}f}"


def _ci(s: dict | None, nd: int = 3) -> str:
    if not s or s["n"] < 2:
        return "—"
    return f"[{s['mean'] - s['ci95']:.{nd}f}, {s['mean'] + s['ci95']:.{nd}f}]"


def _diff(s: dict | None) -> str:
    if not s or s["n"] == 0:
        return "—"
    if s["n"] < 2:
        return f"{s['mean']:+.3f}"
    lo, hi = s["mean"] - s["ci95"], s["mean"] + s["ci95"]
    mark = " *" if lo > 0 or hi < 0 else ""
    return f"{s['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]{mark}"


def dataset_markdown(entry: dict[str, Any], seeds: int | None = None) -> str:
    s = entry["summary"]
    mods = entry["modalities"]
    metric = next(iter(s.values()))["metric"] if s else "metric"
    n = seeds or max((v["n"] for v in s.values()), default=0)
    lines = [f"### {entry['name']}", "", (f"{entry['description']}; {n} seeds; "
             f"{entry.get('seconds', float('nan')):.0f} s."), ""]
    head = (["method", f"test {metric} (mean ± std)", "95% CI", "Δ vs joint, paired [95% CI]"]
            + [f"probe {m}" for m in mods] + [f"drop w/o {m}" for m in mods] + ["time/epoch vs joint"])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, v in sorted(s.items(), key=lambda kv: label_order(kv[0])):
        row = [label, _pm(v["test"]), _ci(v["test"]), _diff(v["diff_joint"]) if label != "joint" else "(reference)"]
        row += [_f(v["probe"][m]["mean"]) for m in mods] + [_f(v["drop"][m]["mean"], 3) for m in mods]
        row += [f"{v['time_vs_joint']:.2f}x" if not math.isnan(v["time_vs_joint"]) else "—"]
        lines.append("| " + " | ".join(row) + " |")
    for label, why in entry.get("skipped", {}).items():
        lines.append(f"| {label} | skipped: {why.splitlines()[0][:140]} |" + " |" * (len(head) - 2))
    if entry.get("bayes"):  # the best any classifier can do on this data, from its generator
        b = entry["bayes"]
        row = ["Bayes-optimal (exact)", f"{b['fused']:.3f}", "—", f"{b['fused'] - s['joint']['test']['mean']:+.3f}"
               if "joint" in s else "—"] + [f"{b[m]:.3f} (alone)" if m in b else "—" for m in mods]
        lines.append("| " + " | ".join(row + ["—"] * (len(head) - len(row))) + " |")
    for f in entry.get("failed", []):
        lines.append(f"| {f['label']} | FAILED (seed {f['seed']}): {f['error'].splitlines()[0][:140]} |"
                     + " |" * (len(head) - 2))
    lines += _shapley_markdown(s, mods, metric)
    # what the joint model leaves on the table, per modality
    uni = {m: s.get(f"unimodal[{m}]") for m in mods}
    if "joint" in s and any(uni.values()):
        lines += ["", ("Utilization under joint training (probe of the joint model's encoder vs the same "
                  "modality trained alone):"), ""]
        for m in mods:
            if uni[m]:
                gap = s["joint"]["probe"][m]["mean"] - uni[m]["test"]["mean"]
                lines.append(f"- {m}: alone {_f(uni[m]['test']['mean'])}, probe in joint "
                             f"{_f(s['joint']['probe'][m]['mean'])} ({gap:+.3f}), drop when removed "
                             f"{_f(s['joint']['drop'][m]['mean'])}")
    rec = {label: v["records"] for label, v in s.items() if any(k.split("/")[0] in ("eps", "B", "cos")
                                                               for k in v["records"])}
    if rec:
        lines += ["", "Method internals (mean over seeds; `train` = mean over all steps, `last` = last epoch):", "",
                  "| method | " + " | ".join(f"{k} train / last" for k in _record_cols(rec, mods)) + " |",
                  "|---|" + "---|" * len(_record_cols(rec, mods))]
        for label, r in sorted(rec.items(), key=lambda kv: label_order(kv[0])):
            cells = [f"{_f(r[k]['mean'])} / {_f(r[k]['last'])}" if k in r else "—" for k in _record_cols(rec, mods)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _shapley_markdown(s: dict[str, Any], mods: Sequence[str], metric: str) -> list[str]:
    """The table of each modality's Shapley contribution per method (none if no run has one)."""
    rows = {label: v for label, v in s.items() if v.get("shapley") and any(x["n"] for x in v["shapley"].values())}
    if not rows:
        return []
    lines = ["", (f"Shapley contribution of each modality to the fused validation {metric} (mean ± std over seeds; "
             "a modality absent from a coalition has its input replaced by its training mean; the contributions add "
             "up to v(all) − v(none)" + (", with the sign flipped: positive = lower error" if metric == "mae" else "")
             + "):"), "",
             "| method | " + " | ".join(f"φ {m}" for m in mods) + " | v(none) | v(all) |",
             "|---|" + "---|" * (len(mods) + 2)]
    for label, v in sorted(rows.items(), key=lambda kv: label_order(kv[0])):
        cells = [_pm(v["shapley"][m]) for m in mods] + [_pm(v["shapley_empty"]), _pm(v["shapley_full"])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def label_order(label: str) -> tuple:
    """Joint first, then CGGM (robust, paper, official, ablations), the other methods, unimodal last."""
    first = {"joint": 0, "cggm": 1, "cggm_paper": 2, "cggm_official": 3}
    if label in first:
        return (first[label], label)
    if label.startswith("cggm"):
        return (4, label)
    return (6 if label.startswith("unimodal") else 5, label)


def _record_cols(rec: dict, mods: Sequence[str]) -> list[str]:
    keys = {k for r in rec.values() for k in r}
    cols = [f"{p}/{m}" for p in ("eps", "B", "cos") for m in mods if f"{p}/{m}" in keys]
    return cols + (["L_gm"] if "L_gm" in keys else [])


SUMMARY_FIELDS = ["dataset", "method", "label", "metric", "n", "mean", "std", "ci95_low", "ci95_high",
                  "diff_joint_mean", "diff_joint_ci95_low", "diff_joint_ci95_high", "seconds_per_epoch",
                  "time_vs_joint"]


def write_report(bench: dict[str, Any], out_dir: str | Path, title: str = "Benchmark report",
                 preamble: str = "") -> dict[str, Path]:
    """``report.md``, ``summary.csv`` (one row per dataset x method), ``runs.csv`` (one row per run)
    and ``bench.json`` (everything) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", ""]
    if preamble:
        md += [preamble, ""]
    md += [("Columns: test metric of the checkpoint selected on validation; Δ = method − joint on the same seed "
           "(`*`: the 95% interval excludes 0); probe = linear-probe test accuracy of that modality's encoder; "
           "drop = fused metric lost when that modality's input is replaced by its training mean at test time; "
           "time = seconds per training epoch relative to joint; φ = Shapley contribution of that modality to the fused "
           "validation metric."), ""]
    for entry in bench["datasets"]:
        md += [dataset_markdown(entry, len(bench["seeds"])), ""]
    paths = {"markdown": out / "report.md", "summary": out / "summary.csv", "runs": out / "runs.csv",
             "json": out / "bench.json"}
    _write_text(paths["markdown"], "\n".join(md))
    mods_all = sorted({m for e in bench["datasets"] for m in e["modalities"]})
    with _text_file(paths["summary"]) as f:
        w = csv.writer(f)
        w.writerow(SUMMARY_FIELDS + [f"probe_{m}" for m in mods_all] + [f"drop_{m}" for m in mods_all]
                   + [f"shapley_{m}" for m in mods_all])
        for e in bench["datasets"]:
            for label, v in e["summary"].items():
                t, d = v["test"], v["diff_joint"] or {"mean": float("nan"), "ci95": float("nan")}
                w.writerow([e["name"], v["method"], label, v["metric"], v["n"], t["mean"], t["std"],
                            t["mean"] - t["ci95"], t["mean"] + t["ci95"], d["mean"], d["mean"] - d["ci95"],
                            d["mean"] + d["ci95"], v["seconds_per_epoch"], v["time_vs_joint"]]
                           + [v["probe"][m]["mean"] if m in v["probe"] else "" for m in mods_all]
                           + [v["drop"][m]["mean"] if m in v["drop"] else "" for m in mods_all]
                           + [v["shapley"][m]["mean"] if m in v.get("shapley", {}) else "" for m in mods_all])
    with _text_file(paths["runs"]) as f:
        w = csv.writer(f)
        w.writerow(["dataset", "label", "method", "seed", "metric", "test", "seconds_per_epoch", "best_epoch"]
                   + [f"probe_{m}" for m in mods_all] + [f"drop_{m}" for m in mods_all]
                   + [f"shapley_{m}" for m in mods_all])
        for e in bench["datasets"]:
            for r in e["runs"]:
                w.writerow([e["name"], r["label"], r["method"], r["seed"], r["metric"], r["test"],
                            r["seconds_per_epoch"], r["best_epoch"]]
                           + [r["probe"].get(m, "") for m in mods_all] + [r["drop"].get(m, "") for m in mods_all]
                           + [r.get("shapley", {}).get(m, "") for m in mods_all])
    _write_text(paths["json"], json.dumps(bench, indent=1, default=float))
    return paths


@contextlib.contextmanager
def _text_file(path: Path):
    """A text file whose content is written to ``path`` atomically when the block ends."""
    f = io.StringIO(newline="")
    yield f
    _write_text(path, f.getvalue())


def _write_text(path: Path, text: str) -> None:
    """``text`` to ``path`` atomically (a temporary file renamed over it): a report being rewritten
    as runs finish is never seen, or left, half written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def merge_benchmarks(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One benchmark dict from several (e.g. one per dataset, run in parallel processes)."""
    if not parts:
        raise ValueError("nothing to merge")
    merged = {k: v for k, v in parts[0].items() if k != "datasets"}
    merged["datasets"] = [e for p in parts for e in p["datasets"]]
    merged["seconds"] = sum(p.get("seconds", 0.0) for p in parts)
    return merged
