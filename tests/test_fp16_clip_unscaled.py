"""fp16 with a GradScaler and gradient clipping in the shared step (cggm.training.step.train_step,
which the engine and Lightning's MethodModule both run): the gradients are unscaled *before* they
are clipped, so clipping sees the true gradients (issue 17). The reference is computed from a copy
of the model without any scaler: its true gradient g, clipped by hand to ``clip`` (g * clip / |g|),
and the SGD step p - lr * g_clipped."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cggm import ModelOutput, Task
from cggm.methods import build_method
from cggm.training.step import train_step

TASK = Task("classification", num_outputs=3)


class TwoModal(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(6, 8), nn.Linear(5, 8), nn.Linear(16, 3)
        self.head_layer = self.fc

    def forward(self, inputs, masks=None):
        h = [torch.tanh(self.a(inputs["a"])), torch.tanh(self.b(inputs["b"]))]
        return ModelOutput(self.fc(torch.cat(h, 1)), h)


@pytest.mark.parametrize("init_scale", [2.0 ** 10, 2.0 ** 16])
def test_fp16_clipping_sees_the_unscaled_gradients(init_scale):
    torch.manual_seed(0)
    model = TwoModal()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    batch = ({"a": torch.randn(12, 6, generator=g) * 3, "b": torch.randn(12, 5, generator=g) * 3}, {},
             torch.randint(0, 3, (12,), generator=g))
    lr = 0.5

    # the reference: the true gradient of a scaler-free copy, clipped by hand, one SGD step
    out = ref(batch[0])
    TASK.loss(out.prediction, batch[2]).backward()
    grads = [p.grad.double() for p in ref.parameters()]
    norm = sum(float((x * x).sum()) for x in grads) ** 0.5
    clip = 0.25 * norm  # active: the true gradients are 4x the bound
    factor = min(1.0, clip / (norm + 1e-6))
    expected = [p.detach().double() - lr * factor * x for p, x in zip(ref.parameters(), grads)]

    method = build_method("joint").bind(model, TASK, ("a", "b"))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    method.set_optimizer(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    result = train_step(method, opt, batch, scaler=scaler, clip_grad_norm=clip)
    assert result.taken
    assert scaler.get_scale() == init_scale  # no overflow: the step was the scaler's ordinary one
    moved = [(p.detach().double() - q.detach().double()) for p, q in zip(model.parameters(), ref.parameters())]
    step_norm = sum(float((d * d).sum()) for d in moved) ** 0.5 / lr
    assert step_norm == pytest.approx(clip, rel=1e-4)  # the clipped true gradients' norm is the bound
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-6)
