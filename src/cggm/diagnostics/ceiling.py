"""How far a run is from the best possible, on data whose ceiling is known (the synthetic benchmark).

* :func:`bayes_ceiling` — the Bayes-optimal accuracy on a split, per modality and fused, for data
  that can compute it (``data.bayes_optimal``), else ``None``.
* :func:`gap_shares` — per imbalance and method, the share of joint training's gap to the ceiling
  that the method closes, ``(method - joint) / (Bayes - joint)``, paired by seed, with a 95%
  t-interval over seeds; for the fused accuracy (against the fused ceiling) and for the weak
  modality's encoder probe (against the weak modality's own ceiling).
* :func:`predictions` — a trained model's test predictions through its method's evaluation path.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..data.base import BatchIterator
from ..metrics.functional import summarize
from ..training.evaluation import EvalStep


def bayes_ceiling(data, split: str = "test") -> dict[str, float] | None:
    """``data.bayes_optimal(split)`` where the data knows its generator, else ``None``."""
    fn = getattr(data, "bayes_optimal", None)
    return None if fn is None else fn(split)


def _summary(values: list[float]) -> dict[str, float]:
    return summarize(values)


def gap_shares(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows ``{imbalance, method, target, mean, ci95, n, values}`` from a sweep result with
    ``result["bayes"]`` (one dict per imbalance, in the order of ``result["imbalances"]``).
    ``target`` is ``"fused"`` (test accuracy vs the fused ceiling) or ``"weak"`` (the weak encoder's
    probe vs the weak modality's ceiling). A seed whose joint run already reaches the ceiling gives
    no share (division by a gap <= 0) and is left out."""
    rows = []
    for imb, bayes in zip(result["imbalances"], result["bayes"]):
        runs = [r for r in result["rows"] if r["imbalance"] == imb]
        joint = {r["seed"]: r for r in runs if r["method"] == "joint"}
        for target, key, ceiling in (("fused", "accuracy", bayes["fused"]), ("weak", "weak_probe", bayes["weak"])):
            for m in result["methods"]:
                vals = []
                for r in runs:
                    if r["method"] != m or r["seed"] not in joint:
                        continue
                    gap = ceiling - joint[r["seed"]][key]
                    if gap > 0:
                        vals.append((r[key] - joint[r["seed"]][key]) / gap)
                s = _summary(vals) if vals else {"mean": float("nan"), "ci95": float("nan"), "n": 0}
                rows.append({"imbalance": imb, "method": m, "target": target, "mean": s["mean"],
                             "ci95": s.get("ci95", float("nan")), "n": len(vals), "values": vals})
    return rows


def gap_table(result: dict[str, Any]) -> str:
    """Markdown: the ceilings, then each method's share of joint's gap closed (mean [95% CI] over
    seeds) per imbalance, for the fused accuracy and for the weak probe."""
    rows = gap_shares(result)
    methods = [m for m in result["methods"] if m != "joint"]
    out = {}
    for target in ("fused", "weak"):
        joint_col = "joint accuracy (gap)" if target == "fused" else "joint weak probe (gap)"
        lines = [f"| imbalance | Bayes fused / strong / weak | {joint_col} | " + " | ".join(methods) + " |",
                 "|---|---|---|" + "---|" * len(methods)]
        body = []
        for imb, bayes in zip(result["imbalances"], result["bayes"]):
            key = "accuracy" if target == "fused" else "weak_probe"
            jv = [r[key] for r in result["rows"] if r["imbalance"] == imb and r["method"] == "joint"]
            jm = sum(jv) / len(jv) if jv else float("nan")
            cells = []
            for m in methods:
                r = next(x for x in rows if x["imbalance"] == imb and x["method"] == m and x["target"] == target)
                cells.append(_cell(r))
            body.append(f"| {imb:g} | {bayes['fused']:.3f} / {bayes['strong']:.3f} / {bayes['weak']:.3f} | "
                        f"{jm:.3f} ({bayes['fused' if target == 'fused' else 'weak'] - jm:+.3f}) | "
                        + " | ".join(cells) + " |")
        out[target] = "\n".join(lines + body)
    seeds = len(result["seeds"])
    return ("Share of joint training's gap to the Bayes-optimal fused accuracy closed, "
            f"(method - joint) / (Bayes - joint), paired by seed; mean [95% t-interval] over {seeds} seeds "
            "(1 = reaches the ceiling, 0 = joint, < 0 = worse than joint):\n\n" + out["fused"]
            + "\n\nThe same for the weak modality's encoder probe against the weak modality's own ceiling "
            "(1 = the weak encoder reaches what the weak modality alone allows):\n\n" + out["weak"] + "\n")


def _cell(r: dict[str, Any]) -> str:
    if not r["n"]:
        return "—"
    if r["n"] < 2 or math.isnan(r["ci95"]):
        return f"{r['mean']:+.2f}"
    return f"{r['mean']:+.2f} [{r['mean'] - r['ci95']:+.2f}, {r['mean'] + r['ci95']:+.2f}]"


@torch.no_grad()
def predictions(model, method, dataset, batch_size: int = 512) -> torch.Tensor:
    """The model's predictions ``[N, ...]`` on ``dataset`` through the bound method's evaluation path
    (``prepare_eval``, ``eval_prediction``), on the host, in the dataset's order."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    step = EvalStep(model, method, method.task, device, tracker=False, method_metrics=False)
    try:
        for inputs, masks, _ in BatchIterator(dataset, batch_size, shuffle=False):
            inputs = {m: x.to(device) for m, x in inputs.items()}
            masks = {m: v.to(device) for m, v in masks.items()}
            out.append(step(inputs, masks, None)[1].float().cpu())
    finally:
        model.train(was)
    return torch.cat(out)


def plot_gap_shares(ax, result: dict[str, Any], xs, span: float) -> None:
    """Each method's share of joint's fused gap closed, mean with its 95% interval over seeds, on ``ax``
    (joint is 0 and the ceiling 1 by definition: drawn as lines)."""
    rows = [r for r in gap_shares(result) if r["target"] == "fused"]
    methods = list(result["methods"])
    ax.axhline(1.0, color="k", linestyle="--", linewidth=1.2)
    ax.axhline(0.0, color="C0" if methods and methods[0] == "joint" else "grey", linewidth=1.0)
    for i, m in enumerate(methods):
        if m == "joint":
            continue
        mean = [next(r["mean"] for r in rows if r["method"] == m and r["imbalance"] == x) for x in result["imbalances"]]
        ci = [next(r["ci95"] for r in rows if r["method"] == m and r["imbalance"] == x) for x in result["imbalances"]]
        dodge = (i - (len(methods) - 1) / 2) * 0.015 * span
        ax.errorbar([x + dodge for x in xs], mean, yerr=[0 if math.isnan(c) else c for c in ci], marker="o",
                    capsize=3, linewidth=1.2, color=f"C{i}")
