"""DI-MML against the equations (spec methods-balancemm.md section 10), recomputed by hand: the
effective dimensions, L_DUC and its one-way gradient, the certainty weights, both stages' losses."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import batch, context, make_optimizer, tiny_data, tiny_model, train_step

from cggm.methods import UnsupportedSettingError, build_method
from cggm.methods.di_mml import certainty_weights, duc_loss, effective_dimensions


def _hand_top(h, y, C):
    """Per-dimension nearest-class-mean accuracy, by loops; top = above the mean accuracy."""
    N, K = len(h), len(h[0])
    mu = [[sum(h[i][k] for i in range(N) if y[i] == c) / max(1, sum(1 for i in range(N) if y[i] == c))
           for k in range(K)] for c in range(C)]
    acc = []
    for k in range(K):
        right = 0
        for i in range(N):
            d = [abs(h[i][k] - mu[c][k]) for c in range(C)]
            right += int(d.index(min(d)) == y[i])
        acc.append(right / N)
    mean = sum(acc) / K
    return {k for k in range(K) if acc[k] > mean}


def test_effective_dimensions_find_planted_dimensions_and_equal_loops():
    g = torch.Generator().manual_seed(0)
    N, K, C = 90, 6, 3
    y = torch.arange(N) % C
    ha, hv = torch.randn(N, K, generator=g), torch.randn(N, K, generator=g)
    ha[:, 0] += 4.0 * y
    ha[:, 1] += 4.0 * y
    hv[:, 1] += 4.0 * y
    hv[:, 2] += 4.0 * y
    A, V = effective_dimensions([ha, hv], y, C)
    assert A.tolist() == [0] and V.tolist() == [2]
    for seed in range(3):  # random features: the sets equal the loop's
        g = torch.Generator().manual_seed(seed + 1)
        ha, hv = torch.randn(30, 5, generator=g), torch.randn(30, 5, generator=g)
        y = torch.randint(0, 3, (30,), generator=g)
        ta, tv = _hand_top(ha.tolist(), y.tolist(), 3), _hand_top(hv.tolist(), y.tolist(), 3)
        A, V = effective_dimensions([ha, hv], y, 3)
        assert set(A.tolist()) == ta - tv and set(V.tolist()) == tv - ta


def _hand_duc(h0, h1, A, V, tau):
    total = 0.0
    for anchor, teacher, dims in ((h1, h0, A), (h0, h1, V)):
        if not dims:
            continue
        B = len(anchor)
        term = 0.0
        for i in range(B):
            s = [sum(anchor[i][k] * teacher[j][k] for k in dims) / tau for j in range(B)]
            term += -(s[i] - math.log(sum(math.exp(v) for v in s)))
        total += term / B
    return total


def test_duc_equals_loop_and_teacher_gets_no_gradient():
    g = torch.Generator().manual_seed(3)
    h0, h1 = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    A, V = [0, 3], [2]
    got = duc_loss(h0, h1, torch.tensor(A), torch.tensor(V), 2.0)
    torch.testing.assert_close(got, torch.tensor(_hand_duc(h0.tolist(), h1.tolist(), A, V, 2.0)))
    a, b = h0.clone().requires_grad_(), h1.clone().requires_grad_()
    duc_loss(a, b, torch.tensor(A), torch.tensor([], dtype=torch.long), 2.0).backward()
    assert a.grad is None or a.grad.abs().sum() == 0  # modality 0 is the teacher on A
    assert b.grad[:, [1, 2, 4, 5]].abs().sum() == 0 and b.grad[:, A].abs().sum() > 0
    a, b = h0.clone().requires_grad_(), h1.clone().requires_grad_()
    duc_loss(a, b, torch.tensor([], dtype=torch.long), torch.tensor(V), 2.0).backward()
    assert b.grad is None or b.grad.abs().sum() == 0


def test_certainty_weights_sum_to_one_and_equal_hand():
    zs = [torch.tensor([[2.0, 0.0, 1.0], [0.1, 0.2, 0.3]]), torch.tensor([[0.0, 3.0, 0.0], [1.0, 1.0, 1.0]])]
    T = 0.5
    w = certainty_weights(zs, T)
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    for i in range(2):
        conf = []
        for z in zs:
            e = [math.exp(v) for v in z[i].tolist()]
            conf.append(max(e) / sum(e))
        ex = [math.exp(c / T) for c in conf]
        torch.testing.assert_close(w[i], torch.tensor([v / sum(ex) for v in ex]))


def _setup(**kw):
    data = tiny_data(2)
    model = tiny_model(data)
    method = build_method("di_mml", **kw).bind(model, data.task, data.modalities)
    opt = make_optimizer(model, method, lr=0.05, kind="sgd")
    return data, model, method, opt


def _ce(z, y):
    return sum(math.log(sum(math.exp(v) for v in z[i])) - z[i][y[i]] for i in range(len(y))) / len(y)


def _lin(h, layer):
    W, b = layer.weight.detach().tolist(), layer.bias.detach().tolist()
    return [[sum(r[k] * W[c][k] for k in range(len(r))) + b[c] for c in range(len(W))] for r in h]


def test_stage1_loss_equals_hand_and_stage2_trains_only_the_fusion_head():
    data, model, method, opt = _setup(tau=3.0, w=0.5, stage1_epochs=2, duc_start=1)
    method.begin_epoch(context(data, model, 0, epochs=3))
    assert method.dims is None and method.current_stage() == 1
    train_step(model, method, opt, *batch(data))
    method.begin_epoch(context(data, model, 1, epochs=3))  # effective dimensions measured here
    # measured over the training split with model.encode in eval mode
    model.eval()
    with torch.no_grad():
        feats = model.encode(*data.train.get_batch(torch.arange(len(data.train)))[:2])
    model.train()
    A, V = effective_dimensions(feats, data.train.get_batch(torch.arange(len(data.train)))[2], 4)
    assert method.dims == {"A": A.tolist(), "V": V.tolist()}
    inputs, masks, target = batch(data, size=8)
    out = model(inputs, masks)
    loss = method.loss(out, target, data.task.loss(out.prediction, target))
    y, h = target.tolist(), [f.detach().tolist() for f in out.features]
    shared = method.shared.modules[0].layer
    hand = sum(_ce(_lin(h[i], method.heads.modules[i].layer), y) + 0.5 * _ce(_lin(h[i], shared), y) for i in range(2))
    hand += _hand_duc(h[0], h[1], method.dims["A"], method.dims["V"], 3.0)
    torch.testing.assert_close(loss.detach(), torch.tensor(hand), rtol=1e-5, atol=1e-5)
    head0 = [p.detach().clone() for p in model.head.parameters()]
    method.backward(loss)
    method.step(opt)
    assert all(torch.equal(a, p.detach()) for a, p in zip(head0, model.head.parameters()))  # fusion head unused
    # stage 2: encoders and the method's heads frozen, the model's fusion head trained with CE
    method.begin_epoch(context(data, model, 2, epochs=3))
    assert method.current_stage() == 2
    enc = [p.detach().clone() for ps in model.modality_parameters().values() for p in ps]
    aux = [p.detach().clone() for p in list(method.heads.modules.parameters()) + list(method.shared.modules.parameters())]
    out = model(inputs, masks)
    torch.testing.assert_close(method.loss(out, target, data.task.loss(out.prediction, target)).detach(),
                               torch.tensor(_ce(out.prediction.detach().tolist(), y)), rtol=1e-5, atol=1e-5)
    method.skip()
    train_step(model, method, opt, inputs, masks, target)
    assert all(torch.equal(a, p.detach()) for a, p in zip(enc, [p for ps in model.modality_parameters().values()
                                                                  for p in ps]))
    params = list(method.heads.modules.parameters()) + list(method.shared.modules.parameters())
    assert all(torch.equal(a, p.detach()) for a, p in zip(aux, params))
    assert any(not torch.equal(a, p.detach()) for a, p in zip(head0, model.head.parameters()))
    # inference: certainty-weighted (f_0, f_1, fused)
    model.eval()
    with torch.no_grad():
        out = model(inputs, masks)
        zs = [method.heads.modules[i](out.features[i]) for i in range(2)] + [out.prediction]
        w = certainty_weights(zs, 1.0)
        torch.testing.assert_close(method.eval_prediction(out), sum(w[:, k:k + 1] * zs[k] for k in range(3)))


def test_default_stages_and_refusals():
    data, model, method, opt = _setup()
    method.resolve_stages(10)
    assert (method.stage1_epochs, method.duc_start) == (9, 1)
    _, _, m2, _ = _setup()
    m2.resolve_stages(2)
    assert (m2.stage1_epochs, m2.duc_start) == (1, 0)
    data3 = tiny_data(3)
    with pytest.raises(UnsupportedSettingError):
        build_method("di_mml").bind(tiny_model(data3), data3.task, data3.modalities)


def test_changes_training_vs_joint():
    data = tiny_data(2)
    results = []
    for name in ("joint", "di_mml"):
        model = tiny_model(data)
        method = build_method(name).bind(model, data.task, data.modalities)
        opt = make_optimizer(model, method, kind="sgd")
        method.begin_epoch(context(data, model, 0))
        train_step(model, method, opt, *batch(data))
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(results[0], results[1])
