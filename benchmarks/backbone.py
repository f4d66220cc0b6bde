"""Training-step time of the fast transformer backbone against torch's reference layers, side by side.

The model is the MOSI preset's (``paper_transformer``: text 300-d, audio 5-d, vision 20-d inputs over
50 steps, d_model 40, 5 heads, the preset's encoder/fusion depths and dropouts, batch 64) built
twice from the same weights: ``attention="reference"`` (``nn.TransformerEncoderLayer``) and
``attention="fast"`` (``cggm.models.fast``). Each trains with its own Adam on the same batch (with a
MOSI-like padding mask shared by the three modalities), for joint training and for CGGM (the
preset's options, ``cggm.build_method("cggm")`` bound with ``optimizer=``; its sequence classifiers
use the same attention implementation as the model, from the same weights). The variants run
interleaved round-robin in one process so machine noise hits them alike; the printed numbers are
medians of the step times and their ratio (reference / fast: above 1 means the fast one is faster).

    python benchmarks/backbone.py                                   # the MOSI preset, CPU
    python benchmarks/backbone.py --encoder-layers 4 --fusion-layers 2
    python benchmarks/backbone.py --device cuda
    python benchmarks/backbone.py --autocast bf16                    # fast backbone under bf16 autocast too
    python benchmarks/backbone.py --compile                          # fast encoders compiled too

Target (issue 11): reference / fast >= 2 for joint training on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

from cggm import Task, build_model
from cggm.config import load_config
from cggm.methods import Method, build_method
from cggm.models.classifiers import SequenceClassifier

SHAPES = {"text": (50, 300), "audio": (50, 5), "vision": (50, 20)}


def load() -> str:
    try:
        return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load n/a"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(batch: int, min_len: int, device: torch.device, seed: int = 0):
    """Random inputs of the MOSI shapes and a padding mask shared by the modalities (padding first,
    as in the aligned MOSI files), lengths uniform in [min_len, T]."""
    gen = torch.Generator().manual_seed(seed)
    T = SHAPES["text"][0]
    x = {m: torch.randn((batch, *s), generator=gen) for m, s in SHAPES.items()}
    lengths = torch.randint(min_len, T + 1, (batch,), generator=gen)
    mask = torch.arange(T).unsqueeze(0) >= (T - lengths).unsqueeze(1)  # True on real steps
    for m in x:
        x[m] = x[m] * mask.unsqueeze(-1)  # zero-padded like the data
    y = torch.empty(batch).uniform_(-3, 3, generator=gen)
    return ({m: v.to(device) for m, v in x.items()}, {m: mask.to(device) for m in x}, y.to(device))


def classifiers(attention: str, layers: int, d_model: int, device: torch.device) -> list[torch.nn.Module]:
    """CGGM's default classifiers for the three [B, 50, d_model] features (regression: 1 output),
    with the given attention implementation, and the same weights for every implementation."""
    torch.manual_seed(1)
    made = [SequenceClassifier(d_model, d_model, 1, layers=layers, attention="reference") for _ in SHAPES]
    if attention != "reference":
        fast = [SequenceClassifier(d_model, d_model, 1, layers=layers, attention=attention) for _ in SHAPES]
        for f, r in zip(fast, made):
            f.load_state_dict(r.state_dict())
        made = fast
    return [c.to(device) for c in made]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=None, help="default: the preset's batch size (64)")
    p.add_argument("--encoder-layers", type=int, default=None, help="default: the preset's")
    p.add_argument("--fusion-layers", type=int, default=None, help="default: the preset's")
    p.add_argument("--min-len", type=int, default=10, help="shortest sequence in the batch (of 50)")
    p.add_argument("--no-mask", action="store_true", help="no padding mask")
    p.add_argument("--methods", default="joint,cggm")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--autocast", choices=["bf16"], default=None,
                   help="also time the fast model under torch.autocast(dtype=bfloat16) (different numerics)")
    p.add_argument("--compile", action="store_true", help="also time the fast model with torch.compile'd encoders")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(preset="mosi")
    opts = dict(cfg["model"]["options"])
    if args.encoder_layers is not None:
        opts["encoder_layers"] = args.encoder_layers
    if args.fusion_layers is not None:
        opts["fusion_layers"] = args.fusion_layers
    batch = args.batch or int(cfg["train"]["batch_size"])
    task = Task("regression", 1)
    x, masks, y = make_batch(batch, args.min_len, device)
    if args.no_mask:
        masks = None

    print(f"MOSI model {cfg['model']['arch']} {opts} batch={batch} device={device} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} steps={args.steps} (median step time; ratio = reference / fast)")
    if device.type == "cpu":
        bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 supported: {bf16}")
    print(load(), flush=True)

    variants = ["reference", "fast"] + (["fast bf16"] if args.autocast else []) + (["fast compiled"] if args.compile
                                                                                    else [])
    print(f"{'method':<8}" + "".join(f"{v + ' ms':>18}" for v in variants) + "".join(
        f"{'ref / ' + v:>22}" for v in variants[1:]) + "   load")
    for method_name in args.methods.split(","):
        torch.manual_seed(0)
        reference = build_model(cfg["model"]["arch"], SHAPES, task, attention="reference", **opts).to(device)
        runs = {}
        for name in variants:
            model = build_model(cfg["model"]["arch"], SHAPES, task, attention=name.split()[0], **opts).to(device)
            model.load_state_dict(reference.state_dict())
            assert sum(q.numel() for q in model.parameters()) == sum(q.numel() for q in reference.parameters())
            if name == "fast compiled":
                t0 = time.perf_counter()
                for enc in model.encoders.values():
                    enc.compile()
                model.fusion.compile()
                compile_note = time.perf_counter() - t0
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            if method_name == "joint":
                method = Method()
            else:
                options = dict(cfg["method"]["options"]) if method_name == "cggm" else {}
                if method_name == "cggm":  # its sequence classifiers: the same implementation and weights
                    options["classifiers"] = classifiers(name.split()[0], options.get("classifier_layers", 1),
                                                         opts["d_model"], device)
                method = build_method(method_name, **options)
            method.bind(model, task, optimizer=opt)
            ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if name == "fast bf16" else (
                contextlib.nullcontext)
            runs[name] = (model, method, opt, ctx)

        def step(model, method, opt, ctx):
            with ctx():
                out = model(x, masks)
                loss = method.loss(out, y, task.loss(out.prediction, y))
            opt.zero_grad(set_to_none=True)
            method.backward(loss)
            method.step(opt)

        times: dict[str, list[float]] = {name: [] for name in runs}
        first: dict[str, float] = {}
        for i in range(args.warmup + args.steps):
            for name, run in runs.items():  # interleaved: noise hits every variant alike
                sync(device)
                t0 = time.perf_counter()
                step(*run)
                sync(device)
                if i == 0:
                    first[name] = time.perf_counter() - t0
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"{method_name:<8}" + "".join(f"{med[v] * 1e3:>18.1f}" for v in variants) + "".join(
            f"{med['reference'] / med[v]:>22.2f}" for v in variants[1:]) + "   " + load(), flush=True)
        if args.compile:
            print(f"         torch.compile: first step {first['fast compiled']:.1f} s "
                  f"(compile() call {compile_note:.2f} s)")
    print("target: reference / fast >= 2 for joint training on CPU")


if __name__ == "__main__":
    main()
