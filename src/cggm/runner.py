"""Build a run (data, model, method, engine) from a config dict, and run methods x seeds."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .config import ConfigError, carry_method_options, resolved_options, same_method, train_config
from .data.registry import load_dataset
from .methods.registry import build_method, list_methods
from .metrics.functional import summarize, t_crit  # noqa: F401  (where they were; the statistics live in metrics)
from .models.factory import build_model
from .training.outputs import set_aside_run, write_json
from .training.trainer import RunResult, TrainConfigError, Trainer, seed_everything


class BenchmarkError(RuntimeError):
    """Some runs of a benchmark failed; every other run was run (and written, if the benchmark
    writes). ``failed``: one ``{"method", "seed", "error", "traceback"}`` per failed run (with
    ``"dataset"`` and ``"label"`` in a report); ``report``: the benchmark of the finished runs."""

    def __init__(self, failed: list[dict[str, Any]], report: dict[str, Any], written: str | Path | None = None):
        self.failed, self.report = list(failed), report
        lines = [f"  {_run_name(f)}: {f['error'].splitlines()[0] if f['error'] else '?'}" for f in self.failed]
        where = f"; the finished runs are in {written}" if written is not None else ""
        super().__init__(f"{len(self.failed)} run{'s' if len(self.failed) != 1 else ''} of the benchmark failed"
                         f"{where} (run again with the same output to retry only these):\n" + "\n".join(lines))


def _run_name(run: dict[str, Any]) -> str:
    where = f"{run['dataset']} " if "dataset" in run else ""
    return f"{where}{run.get('label', run['method'])} seed {run['seed']}"


def run_failure(err: BaseException, **where: Any) -> dict[str, Any]:
    """What is kept of a failed run (called inside its ``except``): ``where`` (method, seed, ...),
    the error as ``"Type: message"`` and its traceback."""
    return {**where, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}


def previous_benchmark(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The benchmark written at ``path`` by an earlier (finished or interrupted) run with the same
    ``settings`` (each key compared as JSON), to keep its finished runs; ``None`` if there is none.
    A file of other settings, or not a benchmark, is refused (:class:`ConfigError`): nothing of it
    is overwritten."""
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} exists and is not a benchmark written by cggm bench ({err}); use another "
                          f"output or move that file away.") from err
    same = json.loads(json.dumps(settings, default=float))
    diff = [k for k in same if not isinstance(old, dict) or old.get(k) != same[k]]
    if diff:
        raise ConfigError(f"{path} holds a benchmark of other settings ({', '.join(diff)} differ), whose finished "
                          f"runs would be overwritten; use another output, or move that file away to start over.")
    return old


def load_data(cfg: dict[str, Any]):
    return load_dataset(cfg["dataset"]["name"], **cfg["dataset"].get("options", {}))


def run_config(cfg: dict[str, Any], data=None, output_dir: str | Path | None = None, device: str | None = None,
               resume: bool = True, progress: bool = True) -> tuple[RunResult, torch.nn.Module]:
    """Train and test one configured run; returns the result and the trained model."""
    trainer = build_trainer(cfg, data, output_dir, device, resume, progress)
    return trainer.fit(), trainer.model


def build_trainer(cfg: dict[str, Any], data=None, output_dir: str | Path | None = None, device: str | None = None,
                  resume: bool = True, progress: bool = True) -> Trainer:
    """Data, model, method and engine of one configured run, every input checked (and a checkpoint
    to resume read and checked) before anything is trained or written; ``.fit()`` runs it. With
    ``resume=False`` the files of an earlier run in ``output_dir`` are then moved into
    ``output_dir/previous-<UTC time>/`` (:func:`cggm.training.outputs.set_aside_run`; one line on stderr says so).

    A checkpoint is resumed only if it was written with the same data (dataset name and options),
    model (architecture and options), method (name and options) and training settings (see
    :class:`~cggm.training.Trainer`); options are compared with their defaults filled in."""
    tc = replace(train_config(cfg), progress=progress and train_config(cfg).progress)
    data = data if data is not None else load_data(cfg)
    seed_everything(tc.seed)  # the model's initial weights depend on the seed
    model = build_model(cfg["model"]["arch"], data.input_shapes, data.task, **cfg["model"].get("options", {}))
    if device is not None:
        model = model.to(device)
    method = build_method(cfg["method"]["name"], **cfg["method"].get("options", {}))
    fingerprint = {"arch": cfg["model"]["arch"], **settings_fingerprint(cfg)}
    try:
        trainer = Trainer(model, method, data, tc, output_dir=output_dir, resume=resume, fingerprint=fingerprint)
    except TrainConfigError as err:  # the settings that need the data, the model and the method (select_metric)
        raise ConfigError([f"train.{msg}" for _, msg in err.problems]) from err
    if not resume and output_dir is not None and distributed.is_main_process():
        # starting over: the earlier run's files go aside first, so that the folder never mixes two
        # runs (a new run that fails would leave its config next to the old checkpoints)
        moved = set_aside_run(output_dir)
        if moved is not None:
            print(f"starting over in {output_dir}: moved the earlier run's files ({', '.join(moved[1])}) to "
                  f"{moved[0]}", file=sys.stderr, flush=True)
    return trainer


def settings_fingerprint(cfg: dict[str, Any]) -> dict[str, Any]:
    """The options of the data, model and method of ``cfg``, defaults filled in, as a run's
    checkpoint records them (the engine adds the method's name, the dataset's name and the
    training settings)."""
    from .data.registry import DATASETS
    from .methods import METHODS
    from .models.factory import MODEL_BUILDERS

    out = {}
    for section, key, registry in (("dataset", "name", DATASETS), ("model", "arch", MODEL_BUILDERS),
                                   ("method", "name", METHODS)):
        name, options = cfg[section][key], cfg[section].get("options") or {}
        out[f"{section}.options"] = resolved_options(registry[name], options) if name in registry else dict(options)
    return out


def expand_methods(spec: str | Sequence[str]) -> list[str]:
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if names == ["all"]:
        return list_methods()
    unknown = [n for n in names if n not in list_methods()]
    if unknown:
        raise ConfigError(f"Unknown method(s) {unknown}. Known: {', '.join(list_methods())}, or 'all'.")
    return names


def comparison_options(cfg: dict[str, Any], methods: Sequence[str],
                       method_options: dict[str, dict] | None = None) -> tuple[dict[str, dict], list[str]]:
    """The options each method runs with when methods are compared on ``cfg``, and lines that say
    where they come from.

    A comparison keeps everything but the method the same: data, model, seeds and training budget
    come from ``cfg``. Method options are per method:

    * the configured method (``cfg["method"]["name"]``) runs with its configured options;
    * a variant of it (the same method class: ``cggm`` -> ``cggm_official``, ``cggm_paper``, ...)
      runs with those of the configured options it takes and does not set itself
      (:func:`cggm.config.carry_method_options`), e.g. a preset's CGGM classifier settings;
    * any other method runs with its own defaults: an option of the same name may mean something
      else there (``lam`` of ``cggm`` and of ``umt``);
    * ``method_options[name]``, if given, is applied on top and wins.
    """
    section = cfg.get("method") or {}
    base, configured = str(section.get("name")), dict(section.get("options") or {})
    fmt = lambda d: ", ".join(f"{k}={v}" for k, v in d.items())  # noqa: E731
    out: dict[str, dict] = {}
    notes: list[str] = []
    defaults: list[str] = []
    for name in dict.fromkeys(methods):
        given = dict((method_options or {}).get(name) or {})
        if name == base:
            kept, dropped = dict(configured), {}
        elif configured and same_method(base, name):
            kept, dropped = carry_method_options(base, configured, name)
        else:
            kept, dropped = {}, {}
            if not given:
                defaults.append(name)
        out[name] = {**kept, **given}
        parts = []
        if kept or dropped:
            parts.append(f"the configured options {fmt(kept)}" if name == base
                         else f"{base}'s options {fmt(kept) if kept else '(none it takes)'}")
        if dropped:
            parts.append("not " + ", ".join(f"{k}={configured[k]} ({why})" for k, why in dropped.items()))
        if given:
            parts.append(f"given {fmt(given)}")
        if parts:
            notes.append(f"{name}: " + "; ".join(parts))
    if configured and defaults:
        notes.append(f"{', '.join(defaults)}: {'its' if len(defaults) == 1 else 'their'} own default options "
                     f"({base}'s options are for {base} and its variants)")
    return out, notes


def bench(cfg: dict[str, Any], methods: Sequence[str], seeds: Sequence[int], method_options: dict[str, dict] | None = None,
          output: str | Path | None = None, progress: bool = False, log=print) -> dict[str, Any]:
    """Every method x seed on the configured dataset and model, same budget. Returns (and writes
    to ``output`` as JSON) every run's metrics (with the options it ran with) and per-method summaries.

    Same data, model, seeds and training budget for every method; method options are per method,
    as :func:`comparison_options` says: the configured method and its variants run with the
    configured options they take, other methods with their own defaults, ``method_options[name]``
    on top. ``log`` receives one line per method whose options are not simply its defaults.

    ``output`` is rewritten (atomically) as each run ends, so an interrupted benchmark keeps its
    finished runs; run again with the same settings and ``output``, it keeps them and runs only the
    others (an ``output`` of other settings is refused). A run that fails is recorded in
    ``"failed"`` (method, seed, error, traceback) and the others go on; at the end
    :class:`BenchmarkError` names the failed runs (its ``report`` holds the finished ones)."""
    data = load_data(cfg)
    options, notes = comparison_options(cfg, methods, method_options)
    for line in notes:
        log(f"  options of {line}")
    settings = {"dataset": data.name, "config": cfg, "method_options": options}
    previous = previous_benchmark(Path(output), settings) if output is not None else None
    kept = {(r["method"], r["seed"]): r for r in (previous or {}).get("runs", [])}
    runs, failed = [], []

    def report() -> dict[str, Any]:
        metric_names = [k for k in runs[0]["test"] if k != "loss"] if runs else []
        summary = {name: {k: summarize([r["test"].get(k, float("nan")) for r in runs if r["method"] == name])
                          for k in metric_names} for name in methods}
        return {"dataset": data.name, "description": data.description, "task": data.task.kind,
                "methods": list(methods), "seeds": list(seeds), "config": cfg, "method_options": options,
                "runs": runs, "failed": failed, "summary": summary}

    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
    for name in methods:
        for seed in seeds:
            if (name, int(seed)) in kept:
                runs.append(kept[(name, int(seed))])
                log(f"  {name:<16} seed {seed}: kept from {output} (finished earlier; a new output runs it again)")
                continue
            run_cfg = {**cfg, "method": {"name": name, "options": options[name]},
                       "train": {**cfg.get("train", {}), "seed": int(seed)}}
            try:
                result, _ = run_config(run_cfg, data=data, progress=progress)
            except Exception as err:  # recorded, named, and raised at the end: the other runs go on
                failed.append(run_failure(err, method=name, options=options[name], seed=int(seed)))
                log(f"  {name:<16} seed {seed}: FAILED: {failed[-1]['error'].splitlines()[0]}")
            else:
                runs.append({"method": name, "options": options[name], "seed": int(seed), "test": result.test,
                             "val": result.val, "best_epoch": result.best_epoch,
                             "seconds_per_epoch": result.seconds_per_epoch, "skipped_steps": result.skipped_steps})
                log(f"  {name:<16} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.test.items()
                                                              if k in data.task.summary_metrics))
            if output is not None:
                write_json(Path(output), report())
    out = report()
    if failed:
        raise BenchmarkError(failed, out, output)
    return out


def format_table(report: dict[str, Any], metrics: Sequence[str] | None = None) -> str:
    """A plain-text table: one row per method, mean +- std over seeds of each metric."""
    summary = report["summary"]
    if not summary:
        return "(no runs)"
    first = next(iter(summary.values()))
    metrics = list(metrics or [m for m in ("accuracy", "f1_weighted", "mae", "corr", "acc2_nonzero", "acc7",
                                           "dice_mean") if m in first])
    n = len(report["seeds"])
    header = ["method"] + [f"{m} (mean +- std, n={n})" for m in metrics]
    # (a method with fewer finished runs than seeds, e.g. a failed run, says how many it has)
    cell = lambda s: ("- (no finished run)" if s["n"] == 0 else f"{s['mean']:.4f} +- {s['std']:.4f}"  # noqa: E731
                      + (f" (n={s['n']})" if 0 < s["n"] != n else ""))
    rows = [[name] + [cell(s[m]) for m in metrics] for name, s in summary.items()]
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
