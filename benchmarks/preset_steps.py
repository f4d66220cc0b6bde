"""Two training steps of every preset's model on tiny random inputs of the preset's shapes, for joint
training and for the preset's method; on CUDA the second step runs under
``torch.cuda.set_sync_debug_mode("error")`` (any host synchronisation inside a step is an error) and
the peak memory of that step (``torch.cuda.max_memory_allocated``) is printed per model and method.

    python benchmarks/preset_steps.py --device cuda          # sync check + peak memory
    python benchmarks/preset_steps.py --device cpu           # the same steps, no sync check
    python benchmarks/preset_steps.py --presets mosi,iemocap --batch 8

A step is the engine's: forward, ``method.loss``, ``zero_grad``, ``method.backward``, the preset's
gradient clipping, ``method.step`` with the preset's optimizer. The first step is outside the sync
check (CGGM builds its classifiers there). The input shapes are those the preset's dataset loader
produces with the preset's options (the datasets themselves are not needed); padded modalities get
random padding masks. Exits 1 if any step fails (a host sync on CUDA included).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import torch

from cggm import Task, build_model
from cggm.config import list_presets, load_config
from cggm.methods import build_method


def _lengths(batch: int, T: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(1, T + 1, (batch,), generator=gen)


def _mask(lengths: torch.Tensor, T: int, pad_first: bool = False) -> torch.Tensor:
    steps = torch.arange(T).unsqueeze(0)
    return steps >= (T - lengths).unsqueeze(1) if pad_first else steps < lengths.unsqueeze(1)


def preset_batch(cfg: dict, batch: int, seed: int = 0):
    """``(input_shapes, task, inputs, masks or None, target)`` for the preset's dataset, random."""
    gen = torch.Generator().manual_seed(seed)
    name, o = cfg["dataset"]["name"], cfg["dataset"].get("options") or {}
    masks = None
    if name in ("mosi", "mosei"):  # aligned 50-step features, one mask shared by the modalities
        dims = {"text": 300, "audio": 5, "vision": 20} if name == "mosi" else {"text": 300, "audio": 74, "vision": 35}
        shapes = {m: (50, d) for m, d in dims.items()}
        task = Task("regression", 1)
        shared = _mask(_lengths(batch, 50, gen), 50, pad_first=True)
        masks = {m: shared for m in shapes}
    elif name == "iemocap":  # MMIN features padded to the longest sequence (at most max_len)
        max_len = {"audio": 350, "vision": 50, "text": 22, **(o.get("max_len") or {})}
        shapes = {"audio": (max_len["audio"], 130), "vision": (max_len["vision"], 342), "text": (max_len["text"], 1024)}
        task = Task("classification", 4)
        masks = {m: _mask(_lengths(batch, s[0], gen), s[0]) for m, s in shapes.items()}
    elif name == "food101":  # frozen ViT-B/16 and BERT-base tokens
        grid = o.get("image_grid", 7)
        shapes = {"image": (1 + grid * grid if grid else 197, 768), "text": (int(o.get("text_len", 50)), 768)}
        task = Task("classification", 101)
        masks = {"text": _mask(_lengths(batch, shapes["text"][0], gen), shapes["text"][0])}
    elif name == "brats":
        crop = o.get("crop") or 160
        shapes = {m: (1, crop, crop) for m in ("flair", "t1", "t1ce", "t2")}
        task = Task("segmentation", 4)
    elif name in ("ave", "cremad", "kinetics_sounds"):
        from cggm.data.balance._av import make_spec

        recipe = o.get("audio_recipe") or {"ave": "pmr_ave", "cremad": "ogm_cremad",
                                            "kinetics_sounds": "logmel_10s"}[name]
        size = int(o.get("image_size", 224))
        shapes = {"audio": (1, *make_spec(recipe, o.get("audio_options")).shape),
                  "visual": (int(o.get("frames", 1)), 3, size, size)}
        classes = {"ave": 28, "cremad": 6}.get(name) or int(o.get("num_classes") or 31)
        task = Task("classification", classes)
    else:  # built-in data that needs no download (synthetic, ...): ask the loader
        from cggm.data import load_dataset

        data = load_dataset(name, **o)
        shapes, task = data.input_shapes, data.task
    x = {m: torch.randn((batch, *s), generator=gen) for m, s in shapes.items()}
    if task.kind == "classification":
        y = torch.randint(0, task.num_outputs, (batch,), generator=gen)
    elif task.kind == "regression":
        y = torch.randn(batch, generator=gen) if task.num_outputs == 1 else torch.randn(batch, task.num_outputs,
                                                                                        generator=gen)
    else:
        first = next(iter(shapes.values()))
        y = torch.randint(0, task.num_outputs, (batch, *first[-2:]), generator=gen)
    return shapes, task, x, masks, y


def make_optimizer(params, train: dict) -> torch.optim.Optimizer:
    """The engine's optimizer for the preset's ``train`` settings."""
    kind, lr, wd = train.get("optimizer", "adam"), float(train.get("lr", 1e-3)), float(train.get("weight_decay", 0.0))
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(train.get("momentum", 0.0)), weight_decay=wd)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    return torch.optim.Adam(params, lr=lr, weight_decay=wd)


def run(preset: str, method_name: str, batch: int, device: torch.device) -> dict:
    cfg = load_config(preset=preset)
    shapes, task, x, masks, y = preset_batch(cfg, batch)
    torch.manual_seed(0)
    model = build_model(cfg["model"]["arch"], shapes, task, **(cfg["model"].get("options") or {})).to(device)
    x = {m: v.to(device) for m, v in x.items()}
    masks = None if masks is None else {m: v.to(device) for m, v in masks.items()}
    y = y.to(device)
    opt = make_optimizer(model.parameters(), cfg["train"])
    options = (cfg["method"].get("options") or {}) if method_name == cfg["method"]["name"] else {}
    method = build_method(method_name, **options).bind(model, task, optimizer=opt)
    clip = cfg["train"].get("clip_grad_norm")

    def step():
        out = model(x, masks)
        loss = method.loss(out, y, task.loss(out.prediction, y))
        opt.zero_grad(set_to_none=True)
        method.backward(loss)
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        method.step(opt)

    cuda = device.type == "cuda"
    step()  # CGGM builds its classifiers here
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
    if cuda:
        torch.cuda.synchronize(device)
    return {"arch": cfg["model"]["arch"], "params": sum(p.numel() for p in model.parameters()),
            "ms": (time.perf_counter() - t0) * 1e3,
            "peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--presets", default="all", help="comma-separated preset names, or all")
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("preset_steps: no CUDA device (torch.cuda.is_available() is False); use --device cpu", file=sys.stderr)
        return 1
    presets = list_presets() if args.presets == "all" else args.presets.split(",")
    cuda = device.type == "cuda"
    print(f"device={device}{' (' + torch.cuda.get_device_name(device) + ')' if cuda else ''} torch={torch.__version__} "
          f"batch={args.batch}; second step " + ("under set_sync_debug_mode('error')" if cuda else
                                                   "timed only (no sync check on cpu)"))
    print(f"{'preset':<17}{'model':<19}{'params':>10}  {'method':<8}{'step ms':>9}{'peak MB':>10}  result")
    failed = 0
    for preset in presets:
        methods = ["joint", load_config(preset=preset)["method"]["name"]]
        peaks = {}
        for method_name in dict.fromkeys(methods):
            try:
                r = run(preset, method_name, args.batch, device)
            except Exception as err:  # report every preset, then fail
                failed += 1
                print(f"{preset:<17}{'':<19}{'':>10}  {method_name:<8}{'':>9}{'':>10}  FAIL {type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}", flush=True)
                traceback.print_exc(limit=6, file=sys.stderr)
                continue
            peaks[method_name] = r["peak_mb"]
            peak = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
            print(f"{preset:<17}{r['arch']:<19}{r['params']:>10}  {method_name:<8}{r['ms']:>9.1f}{peak:>10}  ok",
                  flush=True)
        if cuda and len(peaks) == 2 and all(v for v in peaks.values()):
            a, b = (peaks[m] for m in dict.fromkeys(methods))
            print(f"{'':<17}peak memory {methods[1]} / joint = {b / a:.2f}")
        if cuda:
            torch.cuda.empty_cache()
    print("all steps ok" if not failed else f"{failed} step(s) FAILED", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
