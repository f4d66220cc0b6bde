"""A CGGM bound with one optimizer and stepped with another of another kind (issue 17 item 9): B's
place was chosen from the first (gradients for SGD), the second needs it elsewhere (updates for
Adam), so the step is refused instead of silently keeping the first's choice."""

from __future__ import annotations

import pytest
import torch

from cggm import CGGM, ProtocolError
from cggm.data import load_dataset
from cggm.models import build_model


def _setup():
    d = load_dataset("synthetic", n_train=32, n_val=8, n_test=8)
    torch.manual_seed(0)
    model = build_model("mlp", d.input_shapes, d.task, feature_dim=8, hidden=16, head_hidden=16)
    return d, model


def _step(method, model, d, opt):
    inputs, masks, y = d.train.get_batch(torch.arange(16))
    out = model(inputs, masks)
    loss = method.loss(out, y, d.task.loss(out.prediction, y))
    opt.zero_grad()
    method.backward(loss)
    return method.step(opt)


def test_stepping_with_an_optimizer_of_another_kind_is_refused():
    d, model = _setup()
    method = CGGM().bind(model, d.task, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ProtocolError, match="stepped with Adam"):
        _step(method, model, d, torch.optim.Adam(model.parameters(), lr=1e-3))


def test_stepping_with_another_optimizer_of_the_same_kind_is_fine():
    d, model = _setup()
    method = CGGM().bind(model, d.task, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3))
    other = torch.optim.Adam(model.parameters(), lr=1e-3)
    assert _step(method, model, d, other)
    assert method.optimizer is other
