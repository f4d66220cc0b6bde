"""MBSD against the toolkit's equations (spec methods-balancemm.md section 5 (h)), recomputed by hand."""

from __future__ import annotations

import math

import torch
from helpers import batch, make_optimizer, tiny_data, train_step
from test_mmcosine import linear_model

from cggm.methods import build_method
from cggm.methods.mbsd import mbsd_pair


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _ce(logits, y):
    return -sum(math.log(_softmax(r)[y[i]]) for i, r in enumerate(logits)) / len(y)


def hand_pair(za, zb, y, rs_on="logits"):
    """Per-sample loops with Python floats: (w, RS, KL) of the 'bmm' variant."""
    ws, rss, kls = [], [], []
    for i in range(len(y)):
        pa, pb = _softmax(za[i]), _softmax(zb[i])
        ta, tb = pa[y[i]], pb[y[i]]
        ok = max(range(len(pa)), key=pa.__getitem__) == y[i] or max(range(len(pb)), key=pb.__getitem__) == y[i]
        w = abs(ta - tb) if ok else 0.0
        u, v = (za[i], zb[i]) if rs_on == "logits" else (pa, pb)
        rs = sum((a - b) ** 2 for a, b in zip(u, v)) / len(u)
        ps, pw = max(ta, tb), min(ta, tb)
        ws.append(w)
        rss.append(rs)
        kls.append(pw * (math.log(pw) - ps))
    return ws, rss, kls


def test_pair_terms_b3_c3():
    za = [[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 1.5, 0.0]]
    zb = [[0.3, 1.0, 0.2], [2.0, -1.0, 0.0], [-0.5, 0.4, 2.0]]
    y = [0, 1, 2]  # sample 0: a right; sample 1: both wrong (w = 0); sample 2: b right
    w, rs, kl = mbsd_pair(torch.tensor(za), torch.tensor(zb), torch.tensor(y))
    hw, hrs, hkl = hand_pair(za, zb, y)
    assert hw[1] == 0.0 and w[1] == 0
    torch.testing.assert_close(w, torch.tensor(hw))
    torch.testing.assert_close(rs, torch.tensor(hrs))  # on logits for two modalities
    torch.testing.assert_close(kl, torch.tensor(hkl))
    _, rsp, _ = mbsd_pair(torch.tensor(za), torch.tensor(zb), torch.tensor(y), rs_on="probs")
    torch.testing.assert_close(rsp, torch.tensor(hand_pair(za, zb, y, "probs")[1]))


def test_total_loss_and_gradients_m2_and_m3():
    for M in (2, 3):
        data = tiny_data(M)
        widths = (5, 7, 3)[:M]
        model = linear_model(data, widths=widths)
        method = build_method("mbsd").bind(model, data.task, data.modalities)
        inputs, masks, target = batch(data, size=8)
        out = model(inputs, masks)
        # slice logits by hand: W_m h_m + b/M
        W, b = model.head.weight.detach(), model.head.bias.detach()
        zs, s = [], 0
        for h, d in zip(out.features, widths):
            zs.append((h.detach() @ W[:, s:s + d].t() + b / M).tolist())
            s += d
        y = target.tolist()
        z = out.prediction.detach()
        expected = _ce(z.tolist(), y) + sum(_ce(zm, y) for zm in zs)
        pairs = [(0, 1)] if M == 2 else [(0, 1), (0, 2), (1, 2)]
        for a, c in pairs:
            hw, hrs, hkl = hand_pair(zs[a], zs[c], y, "logits" if M == 2 else "probs")
            expected += sum(wi * (r + k) for wi, r, k in zip(hw, hrs, hkl)) / len(y) / len(pairs)
        feats = [h.detach().requires_grad_() for h in out.features]
        out.features = feats
        loss = method.loss(out, target, data.task.loss(model.predict(feats), target))
        torch.testing.assert_close(loss, torch.tensor(expected, dtype=loss.dtype), rtol=1e-5, atol=1e-5)
        # gradients reach every modality (fused, unimodal and the weighted terms)
        g = torch.autograd.grad(loss, feats)
        assert all(gi.abs().sum() > 0 for gi in g)


def test_weights_carry_gradient_in_bmm_not_in_distill():
    za = torch.tensor([[2.0, 0.5, -1.0]], requires_grad=True)
    zb = torch.tensor([[0.3, 1.0, 0.2]], requires_grad=True)
    y = torch.tensor([0])
    w, _, _ = mbsd_pair(za, zb, y)
    assert w.requires_grad
    ga, gb = torch.autograd.grad(w.sum(), [za, zb])
    assert ga.abs().sum() > 0 and gb.abs().sum() > 0
    w2, _, kl = mbsd_pair(za, zb, y, variant="distill")
    assert not w2.requires_grad
    pa, pb = za.softmax(1).detach(), zb.softmax(1)
    torch.testing.assert_close(kl, (pa * (pa.log() - pb.log())).sum(1))  # a is the stronger here


def test_changes_training_vs_joint_and_window():
    data = tiny_data(2)
    results = []
    for name in ("joint", "mbsd"):
        model = linear_model(data, widths=(5, 7))
        method = build_method(name).bind(model, data.task, data.modalities)
        opt = make_optimizer(model, method, kind="sgd")
        train_step(model, method, opt, *batch(data))
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(results[0], results[1])
    model = linear_model(data, widths=(5, 7))
    method = build_method("mbsd", start_epoch=1).bind(model, data.task, data.modalities)
    out = model(*batch(data)[:2])
    tl = data.task.loss(out.prediction, batch(data)[2])
    assert method.loss(out, batch(data)[2], tl) is tl  # epoch 0 is outside the window
