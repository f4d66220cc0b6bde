"""A method subclass written against the old base still trains the same, with a DeprecationWarning
naming the new spelling of each old hook (cggm.methods.legacy)."""

from __future__ import annotations

import pytest
import torch

from cggm.data import load_dataset
from cggm.methods import Method
from cggm.models import build_model


def _old_style():
    with pytest.warns(DeprecationWarning) as caught:
        class Scaled(Method):  # the old spelling: commit/discard/update/prepare, undeclared edits
            name = "scaled-legacy"

            def __init__(self):
                super().__init__()
                self.count, self.dropped, self.wrapped = 0, 0, 0

            def prepare(self, inputs, masks):
                return {m: x * 2 for m, x in inputs.items()}, masks

            def edit_gradients(self):
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(0.5)

            def update(self, take_step):
                self.wrapped += 1
                return take_step()

            def commit(self, scaler=None):
                self.count += 1

            def discard(self):
                self.dropped += 1
    text = " ".join(str(w.message) for w in caught)
    for new in ("transform_batch", "wrap_optimizer_step", "on_step_taken", "edits_gradients"):
        assert new in text, new
    return Scaled


def test_an_old_style_subclass_still_works_and_is_told_the_new_names():
    Scaled = _old_style()
    assert Scaled.support.edits_gradients and not Scaled.support.accumulates
    d = load_dataset("synthetic", n_train=32, n_val=8, n_test=8)
    torch.manual_seed(0)
    model = build_model("mlp", d.input_shapes, d.task, feature_dim=8, hidden=16, head_hidden=16)
    method = Scaled().bind(model, d.task, d.modalities)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, masks, y = d.train.get_batch(torch.arange(16))
    x2, _ = method.prepare(inputs, masks)
    assert all(torch.equal(x2[m], inputs[m] * 2) for m in inputs)  # the old prepare runs as transform_batch
    before = [p.detach().clone() for p in model.parameters()]
    out = model(*method.prepare(inputs, masks))
    loss = method.loss(out, y, d.task.loss(out.prediction, y))
    opt.zero_grad()
    method.backward(loss)
    grads = [p.grad.clone() for p in model.parameters()]
    method.step(opt)
    assert method.count == 1 and method.wrapped == 1
    # the old edit ran: the SGD step moved each weight by lr * half its unedited gradient
    for b, p, g in zip(before, model.parameters(), grads):
        torch.testing.assert_close(p.detach(), b - 0.1 * g)
    out = model(*method.prepare(inputs, masks))
    method.loss(out, y, d.task.loss(out.prediction, y))
    method.skip()
    assert method.dropped == 1 and method.count == 1
