"""An encoder frozen at bind and unfrozen later (warm-up of a pretrained backbone) is modulated
once it trains (issue 17 item 3): the methods read each modality's trainable parameters at each
step, not once at the first call."""

from __future__ import annotations

import torch

from cggm.data import load_dataset
from cggm.methods import build_method
from cggm.models import build_model


def test_a_parameter_unfrozen_after_bind_is_modulated():
    d = load_dataset("synthetic", n_train=32, n_val=8, n_test=8)
    torch.manual_seed(0)
    model = build_model("mlp", d.input_shapes, d.task, feature_dim=8, hidden=16, head_hidden=16)
    strong = list(model.modality_parameters()[d.modalities[0]])
    for p in strong:
        p.requires_grad_(False)
    method = build_method("ogm", alpha=5.0).bind(model, d.task, d.modalities)
    assert method.modality_parameter_groups()[0] == []
    for p in strong:
        p.requires_grad_(True)  # the warm-up ends
    assert {id(p) for p in method.modality_parameter_groups()[0]} == {id(p) for p in strong}
    # and OGM's coefficient now reaches the unfrozen encoder: its gradient is k times the task's
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    inputs, masks, y = d.train.get_batch(torch.arange(32))
    out = model(inputs, masks)
    loss = method.loss(out, y, d.task.loss(out.prediction, y))
    plain = torch.autograd.grad(loss, strong, retain_graph=True)
    opt.zero_grad()
    method.backward(loss)
    k = method.records()[f"k/{d.modalities[0]}"]
    assert float(k) < 1.0  # the strong modality dominates
    for p, g in zip(strong, plain):
        torch.testing.assert_close(p.grad, g * k)
    method.step(opt)
