"""fp16 autocast + GradScaler on CPU: the loss scale after N steps and the steps the scaler skipped,
for joint training, CGGM without its direction term, CGGM with it (default) and CGGM with the
direction term computed without the fp16 rescaling of g_F (the behaviour before issue 17 item 6).

    python benchmarks/fp16_scale.py [--steps 300]

Model: the MLP late-fusion model on the synthetic benchmark (256 training samples, batch 32, Adam
lr 3e-3), trained until it fits, which is when |g_F| shrinks and the direction term's double
backward used to overflow fp16.
"""

from __future__ import annotations

import argparse

import torch

from cggm.data import BatchIterator, load_dataset
from cggm.methods import CGGM, build_method
from cggm.methods.cggm import GradientCosine
from cggm.models import build_model


def run(make_method, steps: int) -> tuple[float, int, float]:
    data = load_dataset("synthetic", dim=16, n_train=256, n_val=16, n_test=16)
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shapes, data.task, feature_dim=16, hidden=32, head_hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    method = make_method().bind(model, data.task, optimizer=opt)
    scaler = torch.amp.GradScaler("cpu")
    skipped, t, epoch, loss = 0, 0, 0, None
    while t < steps:
        for inputs, masks, target in BatchIterator(data.train, 32, True, epoch=epoch):
            with torch.autocast("cpu", dtype=torch.float16):
                out = model(inputs, masks)
                loss = method.loss(out, target, data.task.loss(out.prediction, target))
            opt.zero_grad(set_to_none=True)
            method.backward(scaler.scale(loss))
            skipped += not method.step(opt, scaler=scaler)
            scaler.update()
            t += 1
            if t >= steps:
                break
        epoch += 1
    return scaler.get_scale(), skipped, float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = {
        "joint": lambda: build_method("joint"),
        "cggm direction=off": lambda: build_method("cggm", direction="off"),
        "cggm (direction=gradient)": lambda: build_method("cggm"),
        "cggm, g_F not rescaled (before)": lambda: CGGM(direction=GradientCosine(rescale=False)),
    }
    print(f"fp16 autocast + GradScaler('cpu'), initial scale 65536, {args.steps} steps")
    print(f"{'variant':34s} {'final scale':>12s} {'skipped':>8s} {'last loss':>10s}")
    for name, make in variants.items():
        scale, skipped, loss = run(make, args.steps)
        print(f"{name:34s} {scale:12.0f} {skipped:8d} {loss:10.4f}", flush=True)


if __name__ == "__main__":
    main()
