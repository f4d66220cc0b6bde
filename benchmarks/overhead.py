"""Time one training step of CGGM against joint training, side by side, for M = 2, 3, 4.

Variants: CGGM's classifiers only (trained each step, B and L_gm not applied: the floor of every
CGGM variant), CGGM magnitude only (lambda = 0; B on the encoders' Adam updates, the default for
Adam), the same with B on gradients (feature hooks), CGGM with the gradient direction term (the
default, a double backward through the head's last layer), and CGGM with the official weight
direction term. Every variant trains the same model (same initial weights) on the same batches,
and the variants are interleaved round-robin so machine noise hits them alike; the printed
numbers are ratios of median step times to joint training's.

Memory, printed after the times: each variant's peak allocation during one training step above
what was allocated when the step began (on CUDA from the allocator's peak statistics, on CPU from
the profiler's allocation events), and the method's persistent state (classifiers, their
optimizer state, the rule), in MB.

    python benchmarks/overhead.py                    # transformer model (the paper's design)
    python benchmarks/overhead.py --arch mlp         # small MLP model (worst case for overhead)
    python benchmarks/overhead.py --device cuda      # on a GPU

Targets (issue 11): on the transformer, <= 1.10 for magnitude only and <= 1.35 with gradient
direction; on the MLP (--arch mlp), <= 1.30 and <= 1.50.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

from cggm import CGGM, Task, build_model
from cggm.methods import Method

VARIANTS = {
    "joint": lambda: Method(),
    # the floor of any CGGM variant: the M auxiliary classifiers trained each step, nothing applied
    "classifiers only": lambda: CGGM(lam=0.0, direction="off", magnitude=False),
    "cggm magnitude only": lambda: CGGM(lam=0.0, direction="off"),
    "cggm magnitude, B on grads": lambda: CGGM(lam=0.0, direction="off", scale_on="gradient"),
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


def bench(arch: str, M: int, steps: int, warmup: int, batch: int, device, seq_len: int,
          phases: bool = False) -> dict[str, float]:
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

    def step(model, method, opt, marks=None):
        out = model(x)
        mark(marks)
        loss = method.loss(out, y, task.loss(out.prediction, y))
        mark(marks)
        opt.zero_grad(set_to_none=True)
        method.backward(loss)
        mark(marks)
        method.step(opt)

    def mark(marks):
        if marks is not None:
            sync(device)
            marks.append(time.perf_counter())

    times: dict[str, list[float]] = {name: [] for name in runs}
    phase_times: dict[str, list[list[float]]] = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, run in runs.items():  # interleaved: noise hits every variant alike
            marks = [] if phases else None
            sync(device)
            t0 = time.perf_counter()
            step(*run, marks)
            sync(device)
            t1 = time.perf_counter()
            if i >= warmup:
                times[name].append(t1 - t0)
                if phases:
                    edges = [t0, *marks, t1]
                    phase_times[name].append([b - a for a, b in zip(edges, edges[1:])])
    med = {name: statistics.median(t) for name, t in times.items()}
    memory = {name: (step_peak_bytes(lambda run=run: step(*run), device), persistent_bytes(run[1]))
              for name, run in runs.items()}
    result = {name: med[name] / med["joint"] for name in med} | {"joint_ms": med["joint"] * 1e3, "memory": memory}
    if phases:  # the median of each phase, in ms
        result["phases"] = {name: [statistics.median(col) * 1e3 for col in zip(*rows)]
                            for name, rows in phase_times.items()}
    return result


def step_peak_bytes(run_step, device) -> float | None:
    """Peak bytes allocated during one call of ``run_step`` above those allocated when it began."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run_step()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - start)
    try:  # CPU: replay the profiler's allocation events (+bytes / -bytes) in time order
        from torch.profiler import ProfilerActivity, profile
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run_step()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    except Exception:  # (the profiler's event API is not public; say n/a rather than guess)
        return None
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return float(peak)


@contextlib.contextmanager
def _quiet_stderr():
    """The CPU profiler's C++ side prints a line to fd 2 at start and stop: keep the table clean."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def persistent_bytes(method) -> float:
    """Bytes of every tensor in the method's state (its modules, their optimizer state, the rule)."""
    seen, total = set(), 0

    def walk(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            if id(x) not in seen:
                seen.add(id(x))
                total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(method.state_dict())
    return float(total)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="transformer", choices=["transformer", "mlp"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--modalities", type=int, nargs="+", default=[2, 3, 4], help="the values of M to run")
    p.add_argument("--phases", action="store_true",
                   help="also print each phase's median time (forward, method.loss, method.backward, method.step)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"arch={args.arch} batch={args.batch} device={device} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} steps={args.steps} (median step time, ratio to joint)")
    names = list(VARIANTS)
    print(f"{'M':<3}{'joint ms':>10}  " + "  ".join(f"{n:>26}" for n in names[1:]))
    results = {}
    for M in args.modalities:
        r = results[M] = bench(args.arch, M, args.steps, args.warmup, args.batch, device, args.seq_len, args.phases)
        print(f"{M:<3}{r['joint_ms']:>10.1f}  " + "  ".join(f"{r[n]:>26.3f}" for n in names[1:]), flush=True)
    if args.arch == "transformer":
        print("targets: magnitude only <= 1.10, with gradient direction <= 1.35")
    else:
        print("targets: magnitude only <= 1.30, with gradient direction <= 1.50")
    if args.phases:
        print("\nphases, median ms: forward | method.loss | method.backward | method.step")
        for M, r in results.items():
            for n in names:
                print(f"{M:<3}{n:<28}" + " | ".join(f"{t:7.3f}" for t in r["phases"][n]))
    mb = 2.0**20
    print("\nmemory, MB: peak allocated during one step above the step's start (persistent method state in brackets)")
    print(f"{'M':<3}" + "  ".join(f"{n:>26}" for n in names))
    for M, r in results.items():
        cells = []
        for n in names:
            peak, state = r["memory"][n]
            cells.append(f"{'n/a' if peak is None else f'{peak / mb:.2f}'} [{state / mb:.2f}]".rjust(26))
        print(f"{M:<3}" + "  ".join(cells))


if __name__ == "__main__":
    main()
