"""MLA against the equations (spec methods-balancemm.md section 1 (h)), recomputed by hand: the
OWM projector, the head-gradient edit, one SGD step of the summed alternation, the test-time fusion."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import batch, context, make_optimizer, tiny_data, train_step
from test_mmcosine import linear_model

from cggm.methods import UnsupportedSettingError, build_method

WIDTHS = (5, 7)


def _hand_owm(P, r, alpha):
    """k = P r^T; P - k k^T / (alpha + r k); / ||.||_F, entry by entry with Python floats."""
    d = len(r)
    k = [sum(P[i][j] * r[j] for j in range(d)) for i in range(d)]
    rk = sum(r[i] * k[i] for i in range(d))
    Q = [[P[i][j] - k[i] * k[j] / (alpha + rk) for j in range(d)] for i in range(d)]
    f = math.sqrt(sum(v * v for row in Q for v in row))
    return [[v / f for v in row] for row in Q]


def _setup(projection="owm", fusion="entropy", head_lr=0.1, **kw):
    data = tiny_data(2)
    model = linear_model(data, widths=WIDTHS)
    method = build_method("mla", projection=projection, fusion=fusion, head_optimizer="sgd", head_lr=head_lr,
                          head_momentum=0.0, **kw).bind(model, data.task, data.modalities)
    opt = make_optimizer(model, method, lr=0.05, kind="sgd")
    method.begin_epoch(context(data, model, 0))
    return data, model, method, opt


def _hand_parts(model, W, b, inputs, target):
    """Per modality, by hand: padded feature u_m, head gradients (G_m, gb_m), encoder gradients."""
    d, B, C = max(WIDTHS), target.shape[0], W.shape[0]
    onehot = torch.zeros(B, C)
    onehot[torch.arange(B), target] = 1.0
    parts = []
    for i, m in enumerate(model.modalities):
        lin = model.encoders[m].lin
        x = inputs[m].flatten(1)
        h = x @ lin.weight.detach().t() + lin.bias.detach()
        u = torch.cat([h, torch.zeros(B, d - h.shape[1])], dim=1)
        z = u @ W.t() + b
        dz = (torch.exp(z) / torch.exp(z).sum(1, keepdim=True) - onehot) / B
        dh = dz @ W[:, :WIDTHS[i]]
        parts.append({"u": u, "G": dz.t() @ u, "gb": dz.sum(0), "dA": dh.t() @ x, "dc": dh.sum(0)})
    return parts


def test_projector_properties():
    torch.manual_seed(1)
    from cggm.methods.mla import owm_update
    r, alpha = torch.randn(6), 0.05
    P1 = owm_update(torch.eye(6), r, alpha)
    raw = torch.eye(6) - torch.outer(r, r) / (alpha + r @ r)
    torch.testing.assert_close(P1, raw / raw.norm())
    torch.testing.assert_close(P1, P1.t())
    torch.testing.assert_close(torch.linalg.matrix_norm(P1), torch.tensor(1.0))
    torch.testing.assert_close(raw @ r, alpha / (alpha + r @ r) * r)  # r is (almost) projected out
    r2 = torch.randn(6)  # from a general P
    torch.testing.assert_close(owm_update(P1, r2, 0.02), torch.tensor(_hand_owm(P1.tolist(), r2.tolist(), 0.02)))


@pytest.mark.parametrize("projection", ["owm", "bmm", "released"])
def test_one_sgd_step_equals_hand_alternation(projection):
    data, model, method, opt = _setup(projection)
    inputs, masks, target = batch(data)
    method.shared_head(model(inputs, masks))  # build the shared head to read its initial weights
    layer = method.head.modules[0].layer
    W0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    enc0 = {m: (model.encoders[m].lin.weight.detach().clone(), model.encoders[m].lin.bias.detach().clone())
            for m in model.modalities}
    fusion_head0 = model.head.weight.detach().clone()
    parts = _hand_parts(model, W0, b0, inputs, target)
    # first visit of the run: P stays I; second: P updated with r = mean u_2, alpha_0 = 0.1^(1 + 0/J)
    P2 = _hand_owm(torch.eye(7).tolist(), parts[1]["u"].mean(0).tolist(), 0.1)
    P2 = torch.tensor(P2)
    G1, G2 = parts[0]["G"], parts[1]["G"]
    expect_gW = {"owm": G1 @ torch.eye(7) + G2 @ P2.t(), "bmm": G1 + G1 + G2 + G2 @ P2.t(),
                 "released": G1 + G2}[projection]
    train_step(model, method, opt, inputs, masks, target)
    torch.testing.assert_close(layer.weight.detach(), W0 - 0.1 * expect_gW, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias.detach(), b0 - 0.1 * (parts[0]["gb"] + parts[1]["gb"]), rtol=1e-5, atol=1e-6)
    for i, m in enumerate(model.modalities):  # encoder m moved by its own L_m only
        A0, c0 = enc0[m]
        torch.testing.assert_close(model.encoders[m].lin.weight.detach(), A0 - 0.05 * parts[i]["dA"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.encoders[m].lin.bias.detach(), c0 - 0.05 * parts[i]["dc"], rtol=1e-5, atol=1e-6)
    assert torch.equal(model.head.weight.detach(), fusion_head0)  # the model's own head is not trained
    if projection == "released":
        assert method.P is None
    else:
        torch.testing.assert_close(method.P, P2, rtol=1e-5, atol=1e-6)
        assert method.calls == 2


def test_projector_advances_over_steps_with_alpha_schedule_and_skip():
    data, model, method, opt = _setup("owm")
    assert method.num_batches == 2  # J counted over the training split (64 samples, batches of 32)
    train_step(model, method, opt, *batch(data, start=0))
    P = method.P.clone()
    inputs, masks, target = batch(data, start=32)
    layer = method.head.modules[0].layer
    parts = _hand_parts(model, layer.weight.detach().clone(), layer.bias.detach().clone(), inputs, target)
    alpha = 0.1 ** (1 + 1 / 2)  # j = 1 of J = 2
    hand = _hand_owm(P.tolist(), parts[0]["u"].mean(0).tolist(), alpha)
    hand = torch.tensor(_hand_owm(hand, parts[1]["u"].mean(0).tolist(), alpha))
    # a skipped step leaves P as it was
    out = model(inputs, masks)
    method.backward(method.loss(out, target, data.task.loss(out.prediction, target)))
    method.skip()
    assert torch.equal(method.P, P) and method.calls == 2
    train_step(model, method, opt, inputs, masks, target)
    torch.testing.assert_close(method.P, hand, rtol=1e-5, atol=1e-6)
    assert method.calls == 4 and method.batch_index == 2


def test_entropy_fusion_equals_hand_weights():
    data, model, method, opt = _setup("owm")
    inputs, masks, target = batch(data, size=5)
    out = model(inputs, masks)
    zs = [z.detach() for z in method.unimodal_logits(out)]
    pred = method.eval_prediction(out).detach()
    lam = []
    for i in range(5):
        ents = []
        for z in zs:
            p = [math.exp(v) / sum(math.exp(w) for w in z[i].tolist()) for v in z[i].tolist()]
            ents.append(-sum(q * math.log(q) for q in p))
        emax = max(ents)
        e = [math.exp(emax - x) for x in ents]
        lam.append([v / sum(e) for v in e])
    hand = torch.stack([sum(lam[i][m] * zs[m][i] for m in range(2)) for i in range(5)])
    torch.testing.assert_close(pred, hand, rtol=1e-5, atol=1e-6)
    from cggm.methods.mla import entropy_weights
    torch.testing.assert_close(entropy_weights(zs).sum(1), torch.ones(5))
    # the authors' batch-level entropy: softmax over the batch dimension, summed over the whole tensor
    ents = []
    for z in zs:
        cols = z.t().tolist()
        total = 0.0
        for col in cols:
            e = [math.exp(v) for v in col]
            total -= sum(v / sum(e) * math.log(v / sum(e)) for v in e)
        ents.append(total)
    e = [math.exp(-x) for x in ents]
    batch_lam = torch.tensor([v / sum(e) for v in e])
    torch.testing.assert_close(entropy_weights(zs, batch_level=True), batch_lam)
    method.fusion = "entropy_batch"
    torch.testing.assert_close(method.eval_prediction(out).detach(), batch_lam[0] * zs[0] + batch_lam[1] * zs[1])
    fixed = build_method("mla", fusion="fixed").bind(model, data.task, data.modalities)
    fixed.head = method.head
    torch.testing.assert_close(fixed.eval_prediction(out).detach(), 0.55 * zs[0] + 0.45 * zs[1])
    with pytest.raises(UnsupportedSettingError, match="fixed_weights"):
        build_method("mla", fusion="fixed", fixed_weights=(1.0,)).bind(model, data.task, data.modalities)


def test_changes_training_vs_joint():
    data = tiny_data(2)
    results = []
    for name in ("joint", "mla"):
        model = linear_model(data, widths=WIDTHS)
        method = build_method(name).bind(model, data.task, data.modalities)
        opt = make_optimizer(model, method, kind="sgd")
        method.begin_epoch(context(data, model, 0))
        train_step(model, method, opt, *batch(data))
        results.append(torch.cat([p.detach().flatten() for p in model.encoders.parameters()]))
    assert not torch.allclose(results[0], results[1])
