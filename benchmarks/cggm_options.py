"""What CGGM's options do on the built-in synthetic benchmark, measured.

For Adam and SGD, and each configuration below, trains the same model on the default synthetic
data (imbalance 3) over several seeds and prints: fused test accuracy, a linear probe of the weak
modality's encoder (utilization), and statistics of B over all steps (mean per modality, share of
steps with a negative B, largest |B|), and the mean cosine of the direction term.

    python benchmarks/cggm_options.py            # 5 seeds, 20 epochs (about 5 minutes on 2 cores)
    python benchmarks/cggm_options.py --seeds 2 --epochs 5
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cggm.data import load_dataset
from cggm.diagnostics import probe_encoders
from cggm.methods import build_method
from cggm.models import build_model
from cggm.training import TrainConfig, Trainer, seed_everything

# (label, method, method options, training overrides). The paper rule's B is unbounded, so it
# acts on gradients, before clipping (B on updates is refused for it); "clip 0.8" is the official
# code's global gradient clipping.
CONFIGS = [
    ("unimodal (weak only)", "unimodal", {"modality": "weak"}, {}),
    ("joint", "joint", {}, {}),
    ("cggm robust, auto (default)", "cggm", {}, {}),
    ("cggm robust, update", "cggm", {"scale_on": "update"}, {}),
    ("cggm robust, gradient", "cggm", {"scale_on": "gradient"}, {}),
    ("cggm paper rule (cggm_paper)", "cggm_paper", {}, {}),
    ("cggm paper rule, clip 0.8", "cggm_paper", {}, {"clip_grad_norm": 0.8}),
    ("cggm robust, direction off", "cggm", {"direction": "off"}, {}),
    ("cggm robust, weight direction (b)", "cggm", {"direction": "weight"}, {}),
    ("cggm official, clip 0.8", "cggm_official", {}, {"clip_grad_norm": 0.8}),
]
OPTIMIZERS = {"adam": 1e-3, "sgd": 0.05}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("synthetic")
    t0 = time.perf_counter()
    print(f"data: {data.description}; {args.seeds} seeds x {args.epochs} epochs; batch 64; "
          f"non-finite steps are skipped and counted")
    header = (f"{'optimizer':<6} {'configuration':<38} {'test acc':>15} {'probe weak':>15} {'B strong':>9} "
              f"{'B weak':>8} {'B<0 %':>7} {'max|B|':>9} {'cos':>6} {'skipped':>7}")
    print(header)
    print("-" * len(header))
    for opt, lr in OPTIMIZERS.items():
        for label, name, opts, train in CONFIGS:
            acc, probe, b_s, b_w, neg, big, cos, skipped = [], [], [], [], [], [], [], 0
            for seed in range(args.seeds):
                seed_everything(seed)
                model = build_model("mlp", data.input_shapes, data.task)
                cfg = TrainConfig(epochs=args.epochs, batch_size=64, optimizer=opt, lr=lr, seed=seed, progress=False,
                                  on_nonfinite="skip", **train)
                r = Trainer(model, build_method(name, **opts), data, cfg).fit()
                acc.append(r.test["accuracy"])
                probe.append(probe_encoders(model, data.train, data.test, data.task)["weak"])
                skipped += r.skipped_steps
                if "B/strong" in r.records:
                    B = np.stack([r.records["B/strong"], r.records["B/weak"]])
                    b_s.append(np.median(B[0]))
                    b_w.append(np.median(B[1]))
                    neg.append(100 * np.mean((B < 0).any(axis=0)))
                    big.append(np.abs(B).max())
                cs = [v for k, v in r.records.items() if k.startswith("cos/")]
                if cs:
                    cos.append(float(np.mean(cs)))
            f = lambda xs: f"{np.mean(xs):.3f}+-{np.std(xs, ddof=1) if len(xs) > 1 else 0:.3f}"  # noqa: E731
            g = lambda xs, fmt="{:.3f}": fmt.format(np.mean(xs)) if xs else "-"  # noqa: E731
            print(f"{opt:<6} {label:<38} {f(acc):>15} {f(probe):>15} {g(b_s):>9} {g(b_w):>8} "
                  f"{g(neg, '{:.1f}'):>7} {g(big, '{:.3g}'):>9} {g(cos, '{:.2f}'):>6} {skipped:>7}", flush=True)
    print(f"\nB strong / B weak: median over steps, mean over seeds. B<0 %: steps with a negative B. "
          f"wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
