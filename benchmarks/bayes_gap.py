"""Where the synthetic benchmark's gap to its Bayes-optimal ceiling comes from, and configurations
tuned on validation to close it. Writes benchmarks/sweep/bayes_gap.json and .md.

    python benchmarks/bayes_gap.py            # 10 epochs, 3 seeds, imbalances 0, 1, 3; tuning at 1
    python benchmarks/bayes_gap.py --quick    # a smoke run (1 seed, 1 epoch, imbalances 0 and 3)

Per imbalance and seed, on the default test split (the sweep's model, budget (``--epochs``) and seeds):

* the weak modality alone (``unimodal``, weak): its accuracy vs the weak ceiling, at the sweep's
  20 epochs and at 60 (is it under-trained even alone, or limited by the model?). The weak
  modality's data is the same at every imbalance (the knob scales only the strong modality), so
  it is trained once per seed;
* the strong modality alone, per imbalance;
* late fusion by the Bayes rule of the unimodal models (the product of their softmax posteriors,
  the prior being uniform), and of the exact strong posterior with the learned weak one: how much
  of the gap remains when each modality is learned alone and fused optimally;
* (the sweep's ``ume``, the library's uni-modal ensemble, averages the unimodal logits: the same
  argmax as that product, with the encoders trained in one model).

Then the tuning (:data:`TUNE`): a few configurations of ``joint``, ``cggm``, ``mmpareto`` and
``ume`` at ``--tune-imbalances`` (seeds 0-2), the one with the best mean validation accuracy kept
per method; the report (``--report``) gives its test share of joint's gap.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cggm.config import default_config
from cggm.data.registry import load_dataset
from cggm.diagnostics.ceiling import predictions
from cggm.report import train_one
from cggm.runner import summarize

# per method, the configurations tried ("train" holds training settings, the rest method options)
TUNE = {"joint": [{}, {"train": {"lr": 3e-3}}],
        "cggm": [{}, {"rho": 2.0}],
        "mmpareto": [{}, {"gamma": 3.0}],
        "ume": [{}, {"train": {"lr": 3e-3}}]}


def acc(logp: torch.Tensor, y: torch.Tensor) -> float:
    return float((logp.argmax(1) == y).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--imbalances", default="0,1,3")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10, help="the sweep's budget (cggm sweep's default)")
    ap.add_argument("--tune-imbalances", default="1")
    ap.add_argument("--output", default=str(Path(__file__).parent / "sweep"))
    ap.add_argument("--report", action="store_true", help="only write bayes_gap.md from bayes_gap.json and "
                    "sweep.json in --output")
    args = ap.parse_args()
    if args.report:
        return report(Path(args.output))
    torch.set_num_threads(1)
    imbalances = [0.0, 3.0] if args.quick else [float(x) for x in args.imbalances.split(",")]
    seeds = [0] if args.quick else list(range(args.seeds))
    epochs = 1 if args.quick else args.epochs
    cfg = default_config()
    cfg["train"] = {"epochs": epochs, "batch_size": 64, "lr": 1e-3}
    long_cfg = {**cfg, "train": {**cfg["train"], "epochs": 3 * epochs}}
    t0 = time.perf_counter()
    out: dict = {"epochs": epochs, "seeds": seeds, "imbalances": imbalances, "weak_alone": {}, "per_imbalance": {},
                 "tuning": {}}
    base = load_dataset("synthetic", imbalance=0.0)
    y = base.test.target
    weak_logp = {}
    for s in seeds:
        row = {}
        for tag, c in (("budget", cfg), ("3x epochs", long_cfg)):
            res, model, method = train_one(c, base, "unimodal", {"modality": "weak"}, s)
            lp = torch.log_softmax(predictions(model, method, base.test), 1)
            row[tag] = acc(lp, y)
            if tag == "budget":
                weak_logp[s] = lp
        out["weak_alone"][s] = row
        print(f"weak alone seed {s}: {row}", flush=True)
    for imb in imbalances:
        data = load_dataset("synthetic", imbalance=imb)
        assert torch.equal(data.test.inputs["weak"], base.test.inputs["weak"])  # the knob leaves the weak data
        bayes = data.bayes_optimal("test")
        exact_strong = torch.log(data.posterior(data.test.inputs, ["strong"]).float())
        rows = []
        for s in seeds:
            res, model, method = train_one(cfg, data, "unimodal", {"modality": "strong"}, s)
            strong_lp = torch.log_softmax(predictions(model, method, data.test), 1)
            rows.append({"seed": s, "strong alone": acc(strong_lp, y),
                         "exact strong x learned weak": acc(exact_strong + weak_logp[s], y),
                         "learned strong x learned weak": acc(strong_lp + weak_logp[s], y)})
            print(f"imbalance {imb} seed {s}: {rows[-1]}", flush=True)
        out["per_imbalance"][imb] = {"bayes": bayes, "rows": rows}
    for imb in ([3.0] if args.quick else [float(x) for x in args.tune_imbalances.split(",")]):
        data = load_dataset("synthetic", imbalance=imb)
        for name, configs in TUNE.items():
            trials = []
            for opts in configs:
                train = {**cfg["train"], **opts.get("train", {})}
                if args.quick:
                    train["epochs"] = epochs
                method_opts = {k: v for k, v in opts.items() if k != "train"}
                runs = [train_one({**cfg, "train": train}, data, name, method_opts, s)[0] for s in seeds[:3]]
                trials.append({"options": opts, "val": [r.val["accuracy"] for r in runs],
                               "test": [r.test["accuracy"] for r in runs]})
                print(f"tune imbalance {imb} {name} {opts}: val {summarize(trials[-1]['val'])['mean']:.4f} "
                      f"test {summarize(trials[-1]['test'])['mean']:.4f}", flush=True)
            best = max(trials, key=lambda t: summarize(t["val"])["mean"])
            out["tuning"].setdefault(imb, {})[name] = {"trials": trials, "selected": best["options"]}
    out["seconds"] = time.perf_counter() - t0
    dest = Path(args.output)
    dest.mkdir(parents=True, exist_ok=True)
    name = "bayes_gap_quick" if args.quick else "bayes_gap"
    (dest / f"{name}.json").write_text(json.dumps(out, indent=1, default=float))
    print(f"wrote {dest / name}.json ({out['seconds']:.0f} s)")


def _ms(v) -> str:
    s = summarize(v)
    return f"{s['mean']:.3f} ± {s['std']:.3f}"


def _share(vals) -> str:
    s = summarize(vals)
    return f"{s['mean']:+.2f} [{s['mean'] - s['ci95']:+.2f}, {s['mean'] + s['ci95']:+.2f}]"


def report(folder: Path) -> None:
    """bayes_gap.md: the decomposition of joint's gap and the tuning, from bayes_gap.json and sweep.json."""
    g = json.loads((folder / "bayes_gap.json").read_text())
    sw = json.loads((folder / "sweep.json").read_text())
    seeds = [int(s) for s in g["seeds"]]
    weak = [g["weak_alone"][str(s)] for s in seeds]
    md = ["# Where the synthetic benchmark's gap to its Bayes-optimal ceiling comes from", "",
          f"Written by `python benchmarks/bayes_gap.py` ({g['seconds'] / 60:.1f} min) and `--report`; the joint and "
          f"method columns come from the sweep (`sweep.json`, {sw['epochs']} epochs, the same seeds). Test split of "
          f"the default data; mean ± std over {len(seeds)} seeds.", "",
          "**The weak modality alone** (its data does not depend on the imbalance knob): ceiling "
          f"{g['per_imbalance'][next(iter(g['per_imbalance']))]['bayes']['weak']:.3f}; trained alone "
          f"{_ms([w['budget'] for w in weak])} at {g['epochs']} epochs, {_ms([w['3x epochs'] for w in weak])} at "
          f"{3 * g['epochs']} epochs.", "",
          "**Fused**, with each modality learned alone and fused by the Bayes rule (product of posteriors):", "",
          "| imbalance | Bayes fused | exact strong x learned weak | learned strong x learned weak | ume (sweep) | joint "
          "| strong alone (ceiling) | joint weak probe | gap: weak alone / strong alone / joint training |",
          "|---|---|---|---|---|---|---|---|---|"]
    for imb, entry in g["per_imbalance"].items():
        rows, b = entry["rows"], entry["bayes"]
        joint = {r["seed"]: r for r in sw["rows"] if r["imbalance"] == float(imb) and r["method"] == "joint"}
        ume = {r["seed"]: r for r in sw["rows"] if r["imbalance"] == float(imb) and r["method"] == "ume"}
        ew = [r["exact strong x learned weak"] for r in rows]
        ll = [r["learned strong x learned weak"] for r in rows]
        jj = [joint[r["seed"]]["accuracy"] for r in rows]
        parts = [b["fused"] - summarize(ew)["mean"], summarize(ew)["mean"] - summarize(ll)["mean"],
                 summarize(ll)["mean"] - summarize(jj)["mean"]]
        md.append(f"| {float(imb):g} | {b['fused']:.3f} | {_ms(ew)} | {_ms(ll)} | {_ms([ume[r['seed']]['accuracy'] for r in rows])} | "
                  f"{_ms(jj)} | {_ms([r['strong alone'] for r in rows])} ({b['strong']:.3f}) | "
                  f"{_ms([joint[r['seed']]['weak_probe'] for r in rows])} | "
                  + " / ".join(f"{p:+.3f}" for p in parts) + " |")
    md += ["", "The last column splits Bayes − joint into: Bayes − (exact strong x learned weak), what the weak "
           "encoder misses even trained alone; the step to (learned strong x learned weak), what the strong "
           "encoder misses alone; and (learned x learned) − joint, what joint training loses against learning each "
           "modality alone and fusing them by the Bayes rule (fusion and balance together; negative: joint does "
           "better).", "",
           "**Tuned on validation** (seeds 0-2; per method the configuration with the best mean validation "
           "accuracy; its test accuracy and its share of the gap, (tuned − joint default) / (Bayes − joint default), "
           "paired by seed, mean [95% t-interval]):", "",
           "| imbalance | method | configurations: val / test accuracy (mean) | selected | test | share of gap |",
           "|---|---|---|---|---|---|"]
    for imb, methods in g["tuning"].items():
        bayes = g["per_imbalance"][imb]["bayes"]["fused"] if imb in g["per_imbalance"] else float("nan")
        jdef = methods["joint"]["trials"][0]["test"]
        for name, t in methods.items():
            tried = "; ".join(f"{json.dumps(x['options'])}: {summarize(x['val'])['mean']:.3f} / "
                              f"{summarize(x['test'])['mean']:.3f}" for x in t["trials"])
            sel = next(x for x in t["trials"] if x["options"] == t["selected"])
            share = [(a - j) / (bayes - j) for a, j in zip(sel["test"], jdef)]
            md.append(f"| {float(imb):g} | {name} | {tried} | {json.dumps(t['selected'])} | {_ms(sel['test'])} | "
                      f"{_share(share)} |")
    (folder / "bayes_gap.md").write_text("\n".join(md) + "\n")
    print(f"wrote {folder / 'bayes_gap.md'}")


if __name__ == "__main__":
    main()
