"""AMCo against the equations (spec methods-balancemm.md section 3 (h)), recomputed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import batch, context, make_optimizer, tiny_data, train_step
from test_mmcosine import linear_model

from cggm.methods import build_method
from cggm.methods.amco import amco_pt


def _dominated():
    data = tiny_data(2)
    model = linear_model(data, widths=(5, 7))
    with torch.no_grad():
        model.head.weight[:, :5] *= 8.0
        model.head.weight[:, 5:] *= 0.01
    return data, model


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _hand_slices(model, feats):
    W, b = model.head.weight.detach(), model.head.bias.detach()
    return [(feats[0] @ W[:, :5].t() + b / 2), (feats[1] @ W[:, 5:].t() + b / 2)]


def test_pt_values():
    for progress, want in ((0.0, 0.0), (0.15, math.sin(math.pi / 4)), (0.1, 0.5), (0.3, 1.0), (2.0, 1.0)):
        assert amco_pt(progress, 0.3) == pytest.approx(want)


def test_shares_by_hand_and_dependent_set_used_from_the_next_step():
    data, model = _dominated()
    method = build_method("amco", seed=4).bind(model, data.task, data.modalities)
    opt = make_optimizer(model, method, kind="sgd", lr=0.0)  # the model stays put: two steps on one batch
    method.begin_epoch(context(data, model, epoch=1, epochs=10))  # l = 0.1: pt = 0.5
    inputs, masks, target = batch(data, size=8)
    out = model(inputs, masks)
    loss = method.loss(out, target, data.task.loss(out.prediction, target))
    assert method.last_masks == {}  # D is empty at the epoch start
    zs = [z.tolist() for z in _hand_slices(model, [h.detach() for h in out.features])]
    shares = [0.0, 0.0]
    for i in range(8):
        p = _softmax(zs[0][i] + zs[1][i])  # one softmax over both modalities' logits
        C = len(zs[0][i])
        shares[0] += sum(p[:C]) / 8
        shares[1] += sum(p[C:]) / 8
    got = method.staged("shares")
    torch.testing.assert_close(got, torch.tensor(shares), rtol=1e-5, atol=1e-6)
    assert float(got.sum()) == pytest.approx(1.0, abs=1e-6) and shares[0] > 0.5
    opt.zero_grad()
    method.backward(loss)
    method.step(opt)
    assert method.dependent == [0]  # measured at this step, used by the next

    # the next step masks modality 0: exactly floor(pt * 5) = 2 zeros, the rest times 1/(1 - 0.5)
    out = model(inputs, masks)
    loss = method.loss(out, target, data.task.loss(out.prediction, target))
    mask = method.last_masks[0]
    assert list(method.last_masks) == [0] and int((mask == 0).sum()) == 2
    feats = [out.features[0].detach() * mask * 2.0, out.features[1].detach()]
    z = torch.cat(feats, 1) @ model.head.weight.detach().t() + model.head.bias.detach()
    z1, z2 = _hand_slices(model, feats)
    y = target.tolist()
    hand = sum(-math.log(_softmax(r.tolist())[y[i]]) for zz in (z, z1, z2) for i, r in enumerate(zz)) / 8
    torch.testing.assert_close(loss, torch.tensor(hand), rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(loss, out.features)
    assert grads[0][:, mask == 0].abs().sum() == 0 and grads[0][:, mask == 1].abs().sum() > 0
    method.skip()
    method.begin_epoch(context(data, model, epoch=2, epochs=10))
    assert method.dependent == []  # emptied at each epoch start


def test_bmm_ramp_counter_and_eval_unmasked():
    data, model = _dominated()
    method = build_method("amco", ramp="bmm").bind(model, data.task, data.modalities)
    opt = make_optimizer(model, method, kind="sgd", lr=0.0)
    for epoch, steps in ((0, 3), (2, 2)):
        method.begin_epoch(context(data, model, epoch=epoch, epochs=10))
        for k in range(steps):
            assert method.progress() == pytest.approx(k * epoch / 10)
            train_step(model, method, opt, *batch(data, size=8))
    assert method.counter == pytest.approx(0.4)
    assert amco_pt(0.2, 0.3) < 1 and amco_pt(0.3, 0.3) == 1.0  # pt = 1 after ceil(3/e) steps
    out = model(*batch(data, size=8)[:2])
    torch.testing.assert_close(method.eval_prediction(out), out.prediction)


def test_changes_training_vs_joint():
    results = []
    for name in ("joint", "amco"):
        data, model = _dominated()
        method = build_method(name).bind(model, data.task, data.modalities)
        opt = make_optimizer(model, method, kind="sgd")
        method.begin_epoch(context(data, model, 0))
        train_step(model, method, opt, *batch(data))
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(results[0], results[1])
