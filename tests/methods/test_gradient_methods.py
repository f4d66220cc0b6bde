"""Defining behaviour of the gradient-editing methods: OGM(-GE), AGM, PMR, MMPareto, InfoReg, Greedy."""

from __future__ import annotations

import math

import torch
from helpers import batch, context, make_optimizer, tiny_data, tiny_model, train_step
from torch.nn import functional as F

from cggm.methods import build_method
from cggm.methods._common import predict_only, true_class_prob
from cggm.methods.agm import agm_coefficients, shapley_responses
from cggm.methods.mmpareto import pareto_combine
from cggm.methods.ogm_ge import ogm_coefficients


def _grads_after(model, method, inputs, masks, target):
    out = model(inputs, masks)
    loss = method.loss(out, target, method.task.loss(out.prediction, target))
    model.zero_grad(set_to_none=True)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    plain = {id(p): g for p, g in zip(params, grads) if g is not None}  # before the method's edits
    method.backward(loss)
    return plain


def test_ogm_coefficient_formula():
    scores = torch.tensor([3.0, 1.5])
    ratio, k = ogm_coefficients(scores, alpha=0.5)
    assert torch.allclose(ratio, torch.tensor([2.0, 0.5]))
    assert torch.allclose(k, torch.tensor([1 - math.tanh(0.5 * 2.0), 1.0]))
    _, k1 = ogm_coefficients(scores, alpha=0.5, offset=1.0)
    assert torch.allclose(k1, torch.tensor([1 - math.tanh(0.5 * 1.0), 1.0]))


def test_ogm_damps_dominant_encoder_exactly():
    data = tiny_data(2)
    model = tiny_model(data)
    method = build_method("ogm", alpha=0.7).bind(model, data.task, data.modalities)
    inputs, masks, target = batch(data)
    plain = _grads_after(model, method, inputs, masks, target)
    out = model(inputs, masks)
    feats = [h.detach() for h in out.features]
    s = torch.stack([true_class_prob(predict_only(model, feats, out.masks, [i]), target).sum() for i in range(2)])
    ratio = s / s.flip(0)
    k = torch.where(ratio > 1, 1 - torch.tanh(0.7 * ratio), torch.ones_like(ratio))
    for i, m in enumerate(data.modalities):
        for p in model.encoders[m].parameters():
            torch.testing.assert_close(p.grad, plain[id(p)] * k[i])
    for p in model.head.parameters():
        torch.testing.assert_close(p.grad, plain[id(p)])
    assert (k < 1).sum() == 1


def test_ogm_ge_noise_matches_gradient_std():
    data = tiny_data(2)
    torch.manual_seed(0)
    from cggm.models import build_model
    model = build_model("mlp", data.input_shapes, data.task, feature_dim=64, hidden=128)
    method = build_method("ogm_ge", alpha=0.5).bind(model, data.task, data.modalities)
    plain = _grads_after(model, method, *batch(data))
    k = method.k
    for i, m in enumerate(data.modalities):
        p = model.encoders[m].net[0].weight  # a large tensor: the empirical std is reliable
        g = plain[id(p)]
        noise = p.grad - k[i] * g
        assert abs(noise.std().item() / g.std().item() - 1) < 0.05
        assert abs(noise.mean().item()) < 0.1 * g.std().item()


def test_agm_shapley_and_coefficients():
    # f(S) = sum of contributions: the Shapley value of i is exactly its contribution
    contrib = [torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]]), torch.tensor([[3.0, 0.0]])]
    resp = shapley_responses(lambda keep: sum(contrib[j] for j in keep), 3)
    for r, c in zip(resp, contrib):
        torch.testing.assert_close(r, c)
    # interaction term split equally between the two modalities
    resp2 = shapley_responses(lambda keep: torch.tensor([[4.0]]) if len(keep) == 2 else torch.tensor([[1.0]]) * (keep == (0,)), 2)
    torch.testing.assert_close(resp2[0] + resp2[1], torch.tensor([[4.0]]))
    torch.testing.assert_close(resp2[0], torch.tensor([[0.5 * (4 - 0) + 0.5 * (1 - 0)]]))
    s, run = torch.tensor([-0.2, -1.0]), torch.tensor([-0.5, -0.5])
    r, eta, k = agm_coefficients(s, run, alpha=0.3)
    torch.testing.assert_close(r, torch.exp(2 * (s - s.mean())))
    torch.testing.assert_close(eta, torch.ones(2))
    torch.testing.assert_close(k, torch.exp(0.3 * (eta - r).clamp_max(7)))
    assert k[0] < 1 < k[1]  # the one ahead is damped, the one behind boosted


def test_agm_scales_encoder_gradients_by_k():
    data = tiny_data(3)
    model = tiny_model(data)
    method = build_method("agm", alpha=0.5).bind(model, data.task, data.modalities)
    inputs, masks, target = batch(data)
    out = model(inputs, masks)
    ref = torch.autograd.grad(data.task.loss(out.prediction, target), list(model.parameters()), retain_graph=True)
    ref = {id(p): g for p, g in zip(model.parameters(), ref)}
    loss = method.loss(out, target, data.task.loss(out.prediction, target))
    loss.backward()
    k = torch.stack([method.records()[f"k/{m}"] for m in data.modalities])
    for i, m in enumerate(data.modalities):
        for p in model.encoders[m].parameters():
            torch.testing.assert_close(p.grad, ref[id(p)] * k[i])
    for p in model.head.parameters():
        torch.testing.assert_close(p.grad, ref[id(p)])


def test_pmr_prototype_loss_acts_on_weaker_modality_only():
    data = tiny_data(2)
    model = tiny_model(data)
    method = build_method("pmr", alpha=0.6).bind(model, data.task, data.modalities)
    method.begin_epoch(context(data, model, 0))
    inputs, masks, target = batch(data)
    out = model(inputs, masks)
    task_loss = data.task.loss(out.prediction, target)
    loss = method.loss(out, target, task_loss)
    rho = torch.stack([method.records()[f"rho/{m}"] for m in data.modalities])
    weak = int(rho.argmin())
    from cggm.methods.pmr import prototype_logits
    z = prototype_logits(out.features[weak], method.prototypes[weak])
    torch.testing.assert_close(loss - task_loss, 0.6 * F.cross_entropy(z, target))
    strong = 1 - weak
    g_strong = torch.autograd.grad(loss - task_loss, out.features[strong], retain_graph=True, allow_unused=True)[0]
    g_weak = torch.autograd.grad(loss - task_loss, out.features[weak], retain_graph=True)[0]
    assert g_strong is None or torch.count_nonzero(g_strong) == 0
    assert torch.count_nonzero(g_weak) > 0


def test_pmr_prototypes_are_class_means():
    data = tiny_data(2)
    model = tiny_model(data)
    method = build_method("pmr").bind(model, data.task, data.modalities)
    method.begin_epoch(context(data, model, 0))
    with torch.no_grad():
        inputs, masks, target = data.train.get_batch(torch.arange(len(data.train)))
        h = model(inputs, masks).features[0]
    for c in range(data.task.num_outputs):
        torch.testing.assert_close(method.prototypes[0][c], h[target == c].mean(0), rtol=1e-4, atol=1e-5)


def test_mmpareto_conflicting_gradients():
    torch.manual_seed(0)
    a = [torch.tensor([1.0, 0.0]), torch.tensor([[0.5]])]
    b = [torch.tensor([-2.0, 1.0]), torch.tensor([[0.1]])]
    new, cos = pareto_combine(a, b, gamma=1.0)
    assert cos < 0
    flat = torch.cat([g.reshape(-1) for g in new])
    fa, fb = torch.cat([g.reshape(-1) for g in a]), torch.cat([g.reshape(-1) for g in b])
    assert flat @ fa >= 0 and flat @ fb >= 0
    assert flat.norm() >= (fa + fb).norm() - 1e-6
    # agreeing gradients: gamma * (a + b)
    new, cos = pareto_combine(a, [2 * g for g in a], gamma=1.5)
    assert cos > 0
    for n, g in zip(new, a):
        torch.testing.assert_close(n, 1.5 * 3 * g)
    # random conflicting pairs: both inner products stay non-negative
    for _ in range(50):
        x, y = torch.randn(20), torch.randn(20)
        (n,), c = pareto_combine([x], [y])
        if c <= 0:
            assert n @ x >= -1e-5 and n @ y >= -1e-5


def test_mmpareto_writes_combined_encoder_gradients():
    data = tiny_data(2)
    model = tiny_model(data)
    method = build_method("mmpareto").bind(model, data.task, data.modalities)
    inputs, masks, target = batch(data)
    out = model(inputs, masks)
    loss = method.loss(out, target, data.task.loss(out.prediction, target))
    l_mm, *uni = method.staged("parts")
    ps = list(model.encoders[data.modalities[0]].parameters())
    g_mm = torch.autograd.grad(l_mm, ps, retain_graph=True)
    g_u = torch.autograd.grad(uni[0], ps, retain_graph=True)
    expected, _ = pareto_combine(g_mm, g_u, 1.5)
    method.backward(loss)
    for p, e in zip(ps, expected):
        torch.testing.assert_close(p.grad, e)


def test_inforeg_proximal_term_on_dominant_encoder_only():
    data = tiny_data(2)
    model = tiny_model(data)
    method = build_method("inforeg", beta=0.9).bind(model, data.task, data.modalities)
    opt = make_optimizer(model, method, kind="sgd")
    method.begin_epoch(context(data, model, 0))
    train_step(model, method, opt, *batch(data))  # moves parameters away from the anchor
    plain = _grads_after(model, method, *batch(data, start=16))
    s = torch.stack([method.records()[f"s/{m}"] for m in data.modalities])
    dom = int(s.argmax())
    beta = 0.9 * math.exp(math.tanh(float(s[dom] - s[1 - dom])))
    for i, m in enumerate(data.modalities):
        for p, a in zip(model.encoders[m].parameters(), method.anchor[i]):
            extra = beta * (p.detach() - a) if i == dom else torch.zeros_like(p)
            torch.testing.assert_close(p.grad, plain[id(p)] + extra)


def test_inforeg_window_closes_when_fisher_stops_growing():
    data = tiny_data(2)
    model = tiny_model(data)
    method = build_method("inforeg", smooth=1, threshold=0.05).bind(model, data.task, data.modalities)
    ctx = context(data, model)
    for trace in (1.0, 2.0, 2.02):
        method.fisher_sum, method.fisher_steps = torch.tensor(trace), 1
        method.finish_epoch(ctx)
        assert method.active == (trace != 2.02)


def test_greedy_rebalances_the_slow_modality():
    data = tiny_data(2)
    model = tiny_model(data)
    method = build_method("greedy", window=2, threshold=0.0, start_epoch=0).bind(model, data.task, data.modalities)
    opt = make_optimizer(model, method, kind="sgd")
    method.begin_epoch(context(data, model, 0))
    speeds = torch.zeros(2)
    for step in range(2):
        train_step(model, method, opt, *batch(data, start=8 * step))
        speeds += torch.stack([method.records()[f"speed/{m}"] for m in data.modalities])
    assert method.phase == "rebalance"
    slow = int(speeds.argmin())
    expected = torch.ones(2)
    expected[slow] = 0
    torch.testing.assert_close(method.replace, expected)
    inputs, masks, target = batch(data, start=20)
    means = [t.clone() for t in method.feature_mean]
    out = model(inputs, masks)
    loss = method.loss(out, target, data.task.loss(out.prediction, target))
    mu = [0.9 * a + 0.1 * h.detach().mean(0) for a, h in zip(means, out.features)]
    feats = [out.features[i] if i == slow else mu[i].expand_as(out.features[i]) for i in range(2)]
    torch.testing.assert_close(loss, data.task.loss(model.predict(feats, None), target))
    model.zero_grad(set_to_none=True)
    loss.backward()
    fast_m, slow_m = data.modalities[1 - slow], data.modalities[slow]
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.encoders[fast_m].parameters())
    assert any(torch.count_nonzero(p.grad) > 0 for p in model.encoders[slow_m].parameters())
