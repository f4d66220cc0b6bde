"""OPM against the equations (spec methods-balancemm.md section 2 (h)), recomputed by hand."""

from __future__ import annotations

import math

import torch
from helpers import batch, context, make_optimizer, tiny_data, train_step
from test_mmcosine import linear_model

from cggm.methods import build_method
from cggm.methods import opm as opm_module
from cggm.methods.opm import opm_drop_probs


def hand_q(s1, s2, q_base, lam):
    out = []
    for a, b in ((s1, s2), (s2, s1)):
        r = math.tanh(max(0.0, a / b - 1))
        out.append(min(1.0, max(0.0, q_base * (1 + lam * r))) if r > 0 else 0.0)
    return out


def test_q_table():
    for s1, s2, q_base, lam in [(10.0, 5.0, 0.4, 0.5), (5.0, 10.0, 0.4, 0.5), (7.0, 7.0, 0.4, 0.5),
                                (30.0, 1.0, 0.8, 2.0), (3.0, 2.9, 0.5, 0.5)]:
        rho, q = opm_drop_probs(torch.tensor([s1, s2]), q_base, lam)
        torch.testing.assert_close(rho, torch.tensor([s1 / s2, s2 / s1]))
        torch.testing.assert_close(q, torch.tensor(hand_q(s1, s2, q_base, lam)))
    assert opm_drop_probs(torch.tensor([7.0, 7.0]), 0.4, 0.5)[1].tolist() == [0.0, 0.0]  # rho = 1: nothing
    assert opm_drop_probs(torch.tensor([30.0, 1.0]), 0.8, 2.0)[1].tolist() == [1.0, 0.0]  # clipped at 1


def _dominated(M=2):
    """A linear model whose first modality dominates (the other modalities' head blocks are small)."""
    data = tiny_data(M)
    model = linear_model(data)
    with torch.no_grad():
        model.head.weight[:, 5:] *= 0.01
        model.head.weight[:, :5] *= 5.0
    return data, model


def _hand_scores(model, out, target, widths=(5, 7)):
    W, b = model.head.weight.detach(), model.head.bias.detach()
    scores, start = [], 0
    for h, d in zip(out.features, widths):
        z = h.detach() @ W[:, start:start + d].t() + b / 2
        start += d
        p = torch.exp(z - z.logsumexp(1, keepdim=True))
        scores.append(float(sum(p[i, target[i]] for i in range(len(target)))))
    return scores


def test_drop_frequency_is_p_exe_times_q_dominant_only():
    data, model = _dominated()
    method = build_method("opm", start_epoch=0, seed=3).bind(model, data.task, data.modalities)
    inputs, masks, target = batch(data)
    out = model(inputs, masks)
    s = _hand_scores(model, out, target)
    q = hand_q(s[0], s[1], 0.4, 0.5)
    assert q[0] > 0.4 and q[1] == 0.0
    drops, n = torch.zeros(2), 0
    for _ in range(1500):
        method.compute_loss(out, target, data.task.loss(out.prediction, target))
        keep = method.last_keep
        n += target.shape[0]
        if keep is not None:
            drops += (1 - keep).sum(0)
    freq = drops / n
    expect = 0.7 * q[0]
    assert abs(freq[0] - expect) < 4 * math.sqrt(expect * (1 - expect) / n) + 0.01, (freq, expect)
    assert freq[1] == 0


def test_loss_theta_filtering_and_gradients_by_hand(monkeypatch):
    # force both modalities' drop probabilities so that some samples lose every modality
    data, model = _dominated()
    monkeypatch.setattr(opm_module, "opm_drop_probs", lambda s, qb, lam: (s, torch.tensor([0.6, 0.5])))
    method = build_method("opm", start_epoch=0, p_exe=1.0, seed=0).bind(model, data.task, data.modalities)
    inputs, masks, target = batch(data)
    out = model(inputs, masks)
    loss = method.loss(out, target, data.task.loss(out.prediction, target))
    keep = method.last_keep
    assert keep is not None and (keep.sum(1) == 0).any() and (keep.sum(1) > 0).any()
    theta = (5 * 0.6 + 7 * 0.5) / 12  # sum_m d_m q_m / sum_m d_m, a constant
    feats = [h.detach().clone().requires_grad_(True) for h in out.features]
    W, b = model.head.weight.detach(), model.head.bias.detach()
    total, rows = 0.0, [i for i in range(len(target)) if keep[i].sum() > 0]
    for i in rows:
        h = torch.cat([feats[0][i] * keep[i, 0] / (1 - theta), feats[1][i] * keep[i, 1] / (1 - theta)])
        z = W @ h + b
        total = total + (z.logsumexp(0) - z[target[i]])  # the label of the same sample
    hand = total / len(rows)
    torch.testing.assert_close(loss, hand, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(loss, out.features)
    want = torch.autograd.grad(hand, feats)
    for m in range(2):
        torch.testing.assert_close(got[m], want[m], rtol=1e-5, atol=1e-7)  # theta, q carry no gradient
        dropped = keep[:, m] == 0
        assert got[m][dropped].abs().sum() == 0 and got[m][~dropped].abs().sum() > 0


def test_warmup_window_eval_and_not_executed_are_plain():
    data, model = _dominated()
    method = build_method("opm", seed=1).bind(model, data.task, data.modalities)
    inputs, masks, target = batch(data)
    out = model(inputs, masks)
    task_loss = data.task.loss(out.prediction, target)
    for epoch in range(6):  # the authors' code drops nothing for epoch <= 5
        method.epoch = epoch
        assert method.compute_loss(out, target, task_loss) is task_loss and method.last_keep is None
    method.epoch = 6
    never = build_method("opm", start_epoch=0, p_exe=0.0).bind(model, data.task, data.modalities)
    assert never.compute_loss(out, target, task_loss) is task_loss
    torch.testing.assert_close(method.eval_prediction(out), out.prediction)


def test_changes_training_vs_joint():
    results = []
    for name, kw in (("joint", {}), ("opm", {"start_epoch": 0, "p_exe": 1.0, "seed": 2})):
        data, model = _dominated()
        method = build_method(name, **kw).bind(model, data.task, data.modalities)
        opt = make_optimizer(model, method, kind="sgd")
        if name == "opm":
            method.begin_epoch(context(data, model, 0))
        train_step(model, method, opt, *batch(data))
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(results[0], results[1])
