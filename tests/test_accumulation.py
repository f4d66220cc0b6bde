"""Gradient accumulation with CGGM (issue 17 item 5): with B on updates, 2 micro-batches of 8 give
the step of one batch of the same 16 samples (the B of the mean metric, the classifiers on the mean
gradient); with B on gradients, where each micro-batch's gradient would carry its own B, it is
refused. The reference is the 1x16 step of an identical copy, not the code's own bookkeeping."""

from __future__ import annotations

import copy

import pytest
import torch
from _twomodal import TASK, TwoModal

from cggm import CGGM, ModelOutput, ProtocolError


def _setup(scale_on):
    torch.manual_seed(0)
    model = TwoModal()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    # lam=0: the direction term is a per-batch quantity (its cosine is not linear in the samples)
    method = CGGM(head_layer=model.fc, lam=0.0, direction="off", scale_on=scale_on).bind(
        model, TASK, ["audio", "video"], optimizer=opt,
        modality_parameters=[model.audio.parameters(), model.video.parameters()])
    g = torch.Generator().manual_seed(1)
    a, v, y = torch.randn(16, 10, generator=g), torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g)
    # batch norm or dropout would make the micro-batches differ from the batch; this model has neither
    return model, method, opt, (a, v, y)


def _step(model, method, opt, chunks):
    opt.zero_grad()
    for a, v, y in chunks:
        pred, h = model(a, v)
        loss = method.loss(ModelOutput(pred, h), y, TASK.loss(pred, y)) / len(chunks)
        method.backward(loss)
    method.step(opt)


def _max_rel(a, b):
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)) for x, y in zip(a, b))


def test_two_micro_batches_equal_one_batch_with_B_on_updates():
    model, method, opt, (a, v, y) = _setup("update")
    m2, meth2, opt2 = copy.deepcopy((model, method, opt))
    # (the deep copy carries the bound model and optimizer along)
    _step(model, method, opt, [(a, v, y)])
    _step(meth2.model, meth2, meth2.optimizer, [(a[:8], v[:8], y[:8]), (a[8:], v[8:], y[8:])])
    one = [p.detach() for p in model.parameters()]
    two = [p.detach() for p in meth2.model.parameters()]
    # accuracy is not linear in the samples but its mean over two equal halves is the batch's: same B
    assert _max_rel(two, one) < 1e-5
    assert _max_rel(list(meth2.classifiers.parameters()), list(method.classifiers.parameters())) < 1e-5
    assert torch.equal(meth2.records()["B/audio"], method.records()["B/audio"])  # the B applied, recorded


def test_B_on_gradients_under_accumulation_is_refused():
    model, method, opt, (a, v, y) = _setup("gradient")
    with pytest.raises(ProtocolError, match="accumulation"):
        _step(model, method, opt, [(a[:8], v[:8], y[:8]), (a[8:], v[8:], y[8:])])
