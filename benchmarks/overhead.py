"""Time one training step of CGGM against joint training, side by side, for M = 2, 3, 4.

Variants: CGGM magnitude only (lambda = 0), CGGM with the gradient direction term (the default,
a double backward through the head's last layer), and CGGM with the official weight direction
term. Every variant trains the same model (same initial weights) on the same batches, and the
variants are interleaved round-robin so machine noise hits them alike; the printed numbers are
ratios of median step times to joint training's.

    python benchmarks/overhead.py                    # transformer model (the paper's design)
    python benchmarks/overhead.py --arch mlp         # small MLP model (worst case for overhead)
    python benchmarks/overhead.py --device cuda      # on a GPU

Targets (issue 2): <= 1.10 for magnitude only, <= 1.35 with gradient direction.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cggm import CGGM, Task, build_model
from cggm.methods import Method

VARIANTS = {
    "joint": lambda: Method(),
    "cggm magnitude only": lambda: CGGM(lam=0.0, direction="off"),
    "cggm + gradient direction": lambda: CGGM(direction="gradient"),
    "cggm + weight direction": lambda: CGGM(direction="weight"),
}


def make_inputs(arch: str, M: int, batch: int, device, seq_len: int, gen: torch.Generator):
    if arch == "transformer":
        dims = [300, 5, 20, 35][:M]
        shapes = {f"m{i}": (seq_len, d) for i, d in enumerate(dims)}
    else:
        shapes = {f"m{i}": (64,) for i in range(M)}
    x = {m: torch.randn((batch, *s), generator=gen).to(device) for m, s in shapes.items()}
    return shapes, x


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(arch: str, M: int, steps: int, warmup: int, batch: int, device, seq_len: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    task = Task("classification", 4)
    shapes, x = make_inputs(arch, M, batch, device, seq_len, gen)
    y = torch.randint(0, 4, (batch,), generator=gen).to(device)
    opts = {"d_model": 40, "heads": 5, "encoder_layers": 4, "fusion_layers": 2} if arch == "transformer" else {}
    torch.manual_seed(0)
    reference = build_model(arch, shapes, task, **opts).to(device)
    runs = {}
    for name, make in VARIANTS.items():
        model = build_model(arch, shapes, task, **opts).to(device)
        model.load_state_dict(reference.state_dict())
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        method = make().bind(model, task, optimizer=opt)
        runs[name] = (model, method, opt)

    def step(model, method, opt):
        out = model(x)
        loss = method.loss(out, y, task.loss(out.prediction, y))
        opt.zero_grad(set_to_none=True)
        method.backward(loss)
        method.step(opt)

    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, run in runs.items():  # interleaved: noise hits every variant alike
            sync(device)
            t0 = time.perf_counter()
            step(*run)
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {name: med[name] / med["joint"] for name in med} | {"joint_ms": med["joint"] * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="transformer", choices=["transformer", "mlp"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"arch={args.arch} batch={args.batch} device={device} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} steps={args.steps} (median step time, ratio to joint)")
    names = list(VARIANTS)
    print(f"{'M':<3}{'joint ms':>10}  " + "  ".join(f"{n:>26}" for n in names[1:]))
    for M in (2, 3, 4):
        r = bench(args.arch, M, args.steps, args.warmup, args.batch, device, args.seq_len)
        print(f"{M:<3}{r['joint_ms']:>10.1f}  " + "  ".join(f"{r[n]:>26.3f}" for n in names[1:]), flush=True)
    print("targets: magnitude only <= 1.10, with gradient direction <= 1.35")


if __name__ == "__main__":
    main()
