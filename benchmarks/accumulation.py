"""Gradient accumulation with CGGM: 2 micro-batches of 8 against one batch of the same 16 samples.

    .venv/bin/python benchmarks/accumulation.py

A two-modality model trained 30 steps (SGD), then one step both ways from copies of the same state;
prints the largest relative difference of the encoder gradients, per rule and per place where B
acts. With B on gradients each micro-batch's gradient would carry its own B (the library refuses
it: ``ProtocolError``); with B on updates the step's B comes from the micro-batches' mean metric.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cggm import CGGM, ModelOutput, Task

TASK = Task("classification", num_outputs=4)


class TwoModal(nn.Module):
    def __init__(self):
        super().__init__()
        self.audio, self.video, self.fc = nn.Linear(10, 16), nn.Linear(12, 16), nn.Linear(32, 4)

    def forward(self, a, v):
        h = [torch.relu(self.audio(a)), torch.relu(self.video(v))]
        return self.fc(torch.cat(h, dim=1)), h


def max_relative_difference(rule: str, scale_on: str) -> str:
    torch.manual_seed(0)
    model = TwoModal()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    method = CGGM(head_layer=model.fc, rule=rule, scale_on=scale_on, lam=0.0, direction="off").bind(
        model, TASK, ["audio", "video"], optimizer=opt,
        modality_parameters=[model.audio.parameters(), model.video.parameters()])
    g = torch.Generator().manual_seed(1)
    w = torch.randn(10, 4, generator=g)

    def batch(n):
        a, v = torch.randn(n, 10, generator=g), torch.randn(n, 12, generator=g)
        return a, v, (a @ w).argmax(1)

    for _ in range(30):
        a, v, y = batch(16)
        opt.zero_grad()
        p, h = model(a, v)
        method.backward(method.loss(ModelOutput(p, h), y, TASK.loss(p, y)))
        method.step(opt)
    a, v, y = batch(16)
    grads = []
    for chunks in ([(a, v, y)], [(a[:8], v[:8], y[:8]), (a[8:], v[8:], y[8:])]):
        m2, meth2, opt2 = copy.deepcopy((model, method, opt))
        opt2.zero_grad()
        try:
            for aa, vv, yy in chunks:
                p, h = m2(aa, vv)
                meth2.backward(meth2.loss(ModelOutput(p, h), yy, TASK.loss(p, yy)) / len(chunks))
        except Exception as err:  # noqa: BLE001 (the refusal is the result)
            return f"refused ({type(err).__name__})"
        grads.append([q.grad.clone() for q in [*m2.audio.parameters(), *m2.video.parameters()]])
    return f"{max(float((x - z).abs().max() / z.abs().max()) for x, z in zip(grads[1], grads[0])):.3g}"


if __name__ == "__main__":
    for rule, scale_on in [("robust", "gradient"), ("robust", "update"), ("paper", "gradient")]:
        print(f"rule={rule:<7} B on {scale_on:<8}  2x8 vs 1x16, max relative difference of encoder gradients: "
              f"{max_relative_difference(rule, scale_on)}")
