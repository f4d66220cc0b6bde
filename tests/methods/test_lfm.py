"""LFM against the equations (spec methods-balancemm.md section 7 (h)), recomputed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import batch, context, make_optimizer, tiny_data, train_step
from test_mmcosine import linear_model
from torch.func import functional_call

from cggm.methods import build_method
from cggm.methods.lfm import fitted_alpha0, lfm_alignment, lfm_delta


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def hand_align(za, zb):
    total = 0.0
    for ra, rb in zip(za, zb):
        p, q = _softmax(ra), _softmax(rb)
        r = [(a + b) / 2 for a, b in zip(p, q)]
        total += 0.5 * (sum(ri * math.log(ri / pi) for ri, pi in zip(r, p)) + sum(ri * math.log(ri / qi) for ri, qi in zip(r, q)))
    return total / len(za)


def test_alignment_by_hand_zero_when_equal_nonnegative():
    za = [[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]]
    zb = [[0.2, 0.1, -1.0], [2.0, -1.0, 0.0]]
    torch.testing.assert_close(lfm_alignment([torch.tensor(za), torch.tensor(zb)]), torch.tensor(hand_align(za, zb)))
    assert float(lfm_alignment([torch.tensor(za), torch.tensor(za) + 3.0])) == pytest.approx(0.0, abs=1e-7)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert float(lfm_alignment([torch.randn(4, 5, generator=g) * 3, torch.randn(4, 5, generator=g)])) >= 0
    zc = [[0.0, 1.0, 0.0], [1.0, 1.0, -1.0]]
    three = lfm_alignment([torch.tensor(za), torch.tensor(zb), torch.tensor(zc)])
    torch.testing.assert_close(three, torch.tensor((hand_align(za, zb) + hand_align(za, zc) + hand_align(zb, zc)) / 3))


def test_fitted_polynomial_values():
    for e, v in ((0, 0.2046), (10, 0.2478), (50, 0.4367), (100, 0.5392), (150, 0.8213), (199, 0.9160)):
        assert fitted_alpha0(e) == pytest.approx(v, abs=1e-4)


def test_delta_on_a_two_tensor_model_equals_explicit_hessian():
    """f(theta) with theta = (u in R^2, v in R^2): delta = mean over u's entries of Hess(L) c."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 2, generator=g), torch.tensor([0, 1, 2, 1, 0, 2])
    A, B = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    a0, a1 = 0.3, 0.7

    def parts(theta):
        u, v = theta[:2], theta[2:]
        za = torch.tanh(x * u) @ A.t()
        zb = (x * v).sin() @ B.t()
        ce = torch.nn.functional.cross_entropy(za + zb, y)
        return ce, a0 * ce + a1 * lfm_alignment([za, zb])

    theta0 = torch.tensor([0.4, -0.9, 1.3, 0.2])
    H = torch.autograd.functional.hessian(lambda t: parts(t)[1], theta0)
    c = torch.autograd.functional.jacobian(lambda t: parts(t)[0], theta0)
    expect = (H @ c)[:2].mean()
    u = theta0[:2].clone().requires_grad_(True)
    v = theta0[2:].clone().requires_grad_(True)
    ce, loss = parts(torch.cat([u, v]))
    torch.testing.assert_close(lfm_delta(ce, loss, [u, v]), expect, rtol=1e-4, atol=1e-6)


def test_learnable_step_on_the_model_matches_full_hessian_clipping_and_halving():
    data = tiny_data(2)
    model = linear_model(data, widths=(5, 7))
    method = build_method("lfm", lr_alpha=50.0).bind(model, data.task, data.modalities)
    assert method.alpha1 == 0.95  # the authors' init (alpha_0, alpha_1) = (0.05, 0.95)
    names = [n for n, p in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    inputs, masks, target = batch(data, "val", 0, 8)  # V: the first 8 samples of the first val batch
    W_cols = [slice(0, 5), slice(5, 12)]

    def parts(flat, a1):
        ps = dict(zip(names, (t.view(s) for t, s in zip(flat.split(sizes), shapes))))
        out = functional_call(model, ps, (inputs, masks))
        W, b = ps["head.weight"], ps["head.bias"]
        zs = [h @ W[:, c].t() + b / 2 for h, c in zip(out.features, W_cols)]
        ce = torch.nn.functional.cross_entropy(out.prediction, target)
        return ce, (1 - a1) * ce + a1 * lfm_alignment(zs)

    H = torch.autograd.functional.hessian(lambda t: parts(t, 0.95)[1], flat0)
    c = torch.autograd.functional.jacobian(lambda t: parts(t, 0.95)[0], flat0)
    delta = float((H @ c)[:sizes[0]].mean())
    method.begin_epoch(context(data, model, 0))
    assert method.last_delta == pytest.approx(delta, rel=1e-3, abs=1e-7)
    assert method.alpha1 == pytest.approx(min(0.95, max(0.05, 0.95 - 50.0 * delta)), abs=1e-6)
    assert method.lr_at(19) == 50.0 and method.lr_at(20) == 25.0 and method.lr_at(45) == 12.5
    for a1 in (0.05, 0.95):  # clipping at both ends
        method.alpha1 = a1
        method.lr_alpha = 1e9
        method.begin_epoch(context(data, model, 1))
        assert method.alpha1 in (0.05, 0.95)
    assert build_method("lfm", init="bmm").alpha1 == 0.05


def test_loss_is_two_times_weighted_sum_by_hand():
    data = tiny_data(2)
    model = linear_model(data, widths=(5, 7))
    method = build_method("lfm").bind(model, data.task, data.modalities)
    method.alpha1 = 0.6
    inputs, masks, target = batch(data, size=8)
    out = model(inputs, masks)
    loss = method.loss(out, target, data.task.loss(out.prediction, target))
    W, b = model.head.weight.detach(), model.head.bias.detach()
    za = (out.features[0].detach() @ W[:, :5].t() + b / 2).tolist()
    zb = (out.features[1].detach() @ W[:, 5:].t() + b / 2).tolist()
    z, y = out.prediction.detach().tolist(), target.tolist()
    ce = sum(-math.log(_softmax(z[i])[y[i]]) for i in range(8)) / 8
    torch.testing.assert_close(loss, torch.tensor(2 * (0.4 * ce + 0.6 * hand_align(za, zb))), rtol=1e-5, atol=1e-6)
    fitted = build_method("lfm", mode="fitted").bind(model, data.task, data.modalities)
    fitted.begin_epoch(context(data, model, 50))
    assert fitted.alpha1 == pytest.approx(1 - 0.4367, abs=1e-4)


def test_changes_training_vs_joint():
    data = tiny_data(2)
    results = []
    for name in ("joint", "lfm"):
        model = linear_model(data, widths=(5, 7))
        method = build_method(name).bind(model, data.task, data.modalities)
        opt = make_optimizer(model, method, kind="sgd")
        method.begin_epoch(context(data, model, 0))
        train_step(model, method, opt, *batch(data))
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(results[0], results[1])
