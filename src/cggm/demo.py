"""``cggm demo``: joint training vs CGGM on the built-in synthetic data.

For each seed it trains the same model with: the weak modality alone (its encoder's reference
probe), joint training, CGGM with the robust rule (the default), CGGM with the paper's raw rule
(without and with the official code's gradient clipping at 0.8) and CGGM with our under-use rule.
It prints the fused test accuracy and a linear probe of the weak modality's encoder, and
writes a PNG of each modality's auxiliary-classifier accuracy over training (joint and CGGM) and of
CGGM's B (joint training applies none, so none is drawn for it). The table ends with the
Bayes-optimal row: the best accuracy any classifier can reach in expectation on this data
(fused), and under the probe the weak modality's own ceiling, computed exactly from the data's
generator (:meth:`cggm.data.synthetic.SyntheticSplits.bayes_optimal`).

Joint training is run as CGGM with both modulations off: the auxiliary classifiers still train
on detached features (so their metric can be plotted), but nothing reaches the model, so the
model's training is joint training exactly (a test checks this).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .data.registry import load_dataset
from .diagnostics.probe import probe_encoders
from .methods.cggm import CGGM
from .methods.registry import build_method
from .models.factory import build_model
from .runner import summarize
from .training.trainer import TrainConfig, Trainer, seed_everything

DEMO_METHODS = {
    "unimodal (weak only)": lambda weak: build_method("unimodal", modality=weak),
    "joint": lambda weak: CGGM(magnitude=False, direction="off"),
    "cggm (robust rule)": lambda weak: build_method("cggm"),
    "cggm (paper rule)": lambda weak: build_method("cggm_paper"),
    "cggm (paper rule, clip 0.8)": lambda weak: build_method("cggm_paper"),
    "cggm (underuse rule)": lambda weak: build_method("cggm_underuse"),
}
# rows that differ in a training setting: the official code clips the global gradient norm at 0.8
DEMO_TRAIN = {"cggm (paper rule, clip 0.8)": {"clip_grad_norm": 0.8}}


def run_demo(output_dir: str | Path = "demo_output", seeds: int = 5, epochs: int = 20, log=print) -> dict:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("synthetic")
    weak = data.info["weak_modalities"][0]
    log(f"data: {data.description}; train/val/test = {len(data.train)}/{len(data.val)}/{len(data.test)}")
    t0 = time.perf_counter()
    rows: dict[str, dict[str, list[float]]] = {}
    plots: dict[str, dict[str, list[float]]] = {}
    for label, make in DEMO_METHODS.items():
        for seed in range(seeds):
            seed_everything(seed)
            model = build_model("mlp", data.input_shapes, data.task)
            config = TrainConfig(epochs=epochs, batch_size=64, lr=1e-3, seed=seed, progress=False,
                                 **DEMO_TRAIN.get(label, {}))
            result = Trainer(model, make(weak), data, config).fit()
            probe = probe_encoders(model, data.train, data.test, data.task)
            r = rows.setdefault(label, {"test accuracy": [], f"probe {weak}": [], "seconds": []})
            r["test accuracy"].append(result.test["accuracy"])
            r[f"probe {weak}"].append(probe[weak])
            r["seconds"].append(result.seconds)
            if seed == 0 and label in ("joint", "cggm (robust rule)"):
                plots[label] = result.records
            log(f"  {label:<22} seed {seed}: test acc {result.test['accuracy']:.4f}, "
                f"probe({weak}) {probe[weak]:.4f}")
    ceiling = data.bayes_optimal("test")  # exact, from the generator: no method can do better in expectation
    bayes = {"test accuracy": ceiling["fused"], f"probe {weak}": ceiling[weak]}
    table = format_demo_table(rows, seeds, bayes=bayes)
    log("")
    log(table)
    summary = {label: {k: summarize(v) for k, v in r.items()} for label, r in rows.items()}
    (out / "demo.json").write_text(json.dumps({"rows": rows, "summary": summary, "bayes_optimal": ceiling}, indent=1))
    png = None
    try:
        from .diagnostics.plots import save_figure

        png = save_figure(demo_figure(plots), out / "demo.png")
        log(f"\nwrote {png}")
    except ImportError as err:
        log(f"\nno plot: {err}")
    log(f"total time {time.perf_counter() - t0:.1f} s")
    return {"rows": rows, "table": table, "png": None if png is None else str(png)}


def demo_figure(records: dict[str, dict[str, list[float]]], window: int = 25):
    """The demo's figure: each modality's auxiliary-classifier accuracy for joint training and CGGM,
    and CGGM's B. Joint training is CGGM with both modulations off: its B is computed but applied to
    nothing, so only its classifiers' metric is drawn."""
    from .diagnostics.plots import records_figure

    drawn = {label: {k: v for k, v in rec.items() if label != "joint" or k.startswith("eps/")}
             for label, rec in records.items()}
    return records_figure(drawn, prefixes=("eps/", "B/"), window=window, metric="accuracy",
                          title="joint training vs CGGM (robust rule) on the synthetic data, seed 0",
                          note="joint training applies no B, so only CGGM's B is drawn")


def format_demo_table(rows: dict[str, dict[str, list[float]]], seeds: int,
                      bayes: dict[str, float] | None = None) -> str:
    """The demo's table; ``bayes`` (column -> value) adds the Bayes-optimal row: the fused ceiling
    under test accuracy, the weak modality's own ceiling under its probe."""
    cols = [c for c in next(iter(rows.values())) if c != "seconds"]
    header = ["method"] + [f"{c} (mean +- std over {seeds} seeds)" for c in cols]
    body = []
    for label, r in rows.items():
        body.append([label] + [f"{summarize(r[c])['mean']:.4f} +- {summarize(r[c])['std']:.4f}" for c in cols])
    if bayes:
        body.append(["Bayes-optimal (exact)"] + [f"{bayes[c]:.4f}" if c in bayes else "" for c in cols])
    widths = [max(len(x[i]) for x in [header] + body) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths)) for x in [header] + body)
