"""Defining behaviour of the loss / schedule / test-time-fusion methods: G-Blending, UMT, UME,
QMF, ReconBoost, MRD, MSLR."""

from __future__ import annotations

import pytest
import torch
from helpers import batch, context, make_optimizer, tiny_data, tiny_model, train_step
from torch.nn import functional as F

from cggm.methods import UnsupportedSettingError, build_method
from cggm.methods.gblending import gblend_weights
from cggm.methods.qmf import qmf_fuse
from cggm.methods.reconboost import reconboost_loss
from cggm.types import Task


def test_gblending_weights_follow_og_ratio():
    # heads: a, b, fused. rows: train loss, held-out loss
    before = torch.tensor([[1.0, 1.0, 1.0], [1.2, 1.2, 1.2]])
    after = torch.tensor([[0.5, 0.9, 0.4], [1.0, 1.1, 1.3]])
    w = gblend_weights(before, after)
    dG = torch.tensor([0.2, 0.1, -0.1]).clamp_min(0)
    dO = torch.tensor([0.5 - 0.2, 0.2 - 0.2, 0.9 - 0.2])
    raw = dG / (dO ** 2 + 1e-8)
    torch.testing.assert_close(w, raw / raw.sum())
    assert w[2] == 0  # a head whose held-out loss got worse gets no weight
    torch.testing.assert_close(gblend_weights(before, before + 1), torch.full((3,), 1 / 3))


def test_gblending_epoch_end_uses_held_out_losses():
    data = tiny_data(2)
    model = tiny_model(data)
    method = build_method("gblending").bind(model, data.task, data.modalities)
    opt = make_optimizer(model, method)
    ctx = context(data, model, 0)
    method.begin_epoch(ctx)
    first = method.measured.clone()
    assert first.shape == (2, 3)
    for step in range(3):
        train_step(model, method, opt, *batch(data, start=16 * (step % 3)))
    method.finish_epoch(ctx)
    torch.testing.assert_close(method.weights, gblend_weights(first, method.measured))
    # the loss is the weighted sum of head losses
    inputs, masks, target = batch(data)
    out = model(inputs, masks)
    tl = data.task.loss(out.prediction, target)
    loss = method.loss(out, target, tl)
    uni = [data.task.loss(method.heads.modules[i](h), target) for i, h in enumerate(out.features)]
    torch.testing.assert_close(loss, (method.weights * torch.stack(uni + [tl])).sum())


def test_umt_distills_teacher_features():
    data = tiny_data(2)
    student = tiny_model(data, seed=0)
    teachers = [tiny_model(data, seed=s) for s in (1, 2)]
    snap = [{k: v.clone() for k, v in t.state_dict().items()} for t in teachers]
    method = build_method("umt", lam=0.5, teachers=teachers).bind(student, data.task, data.modalities)
    inputs, masks, target = batch(data)
    inputs, masks = method.prepare(inputs, masks)
    out = student(inputs, masks)
    tl = data.task.loss(out.prediction, target)
    loss = method.loss(out, target, tl)
    with torch.no_grad():
        t_feats = [teachers[i].encode(inputs, masks)[i] for i in range(2)]
    expected = tl + 0.5 * sum(F.mse_loss(out.features[i], t_feats[i]) for i in range(2))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    for t, s in zip(teachers, snap):  # given teachers are frozen
        assert all(p.grad is None for p in t.parameters())
        assert all(torch.equal(v, s[k]) for k, v in t.state_dict().items())


def test_umt_online_teachers_train_unimodally():
    data = tiny_data(2)
    model = tiny_model(data)
    method = build_method("umt").bind(model, data.task, data.modalities)
    t0 = [p.detach().clone() for p in method.teachers.modules[0].parameters()]
    inputs, masks, target = batch(data)
    only0 = {m: x if m == data.modalities[0] else torch.zeros_like(x) for m, x in inputs.items()}
    with torch.no_grad():
        expected = data.task.loss(method.teachers.modules[0](only0, masks).prediction, target)
    opt = make_optimizer(model, method)
    train_step(model, method, opt, inputs, masks, target)
    torch.testing.assert_close(method.records()[f"teacher/{data.modalities[0]}"], expected)
    assert any(not torch.equal(a, p) for a, p in zip(t0, method.teachers.modules[0].parameters()))
    # the teachers are copies, not the student
    assert all(p is not q for p, q in zip(method.teachers.modules[0].parameters(), model.parameters()))


def test_ume_trains_unimodal_models_and_averages_at_test_time():
    data = tiny_data(2)
    model = tiny_model(data)
    method = build_method("ume").bind(model, data.task, data.modalities)
    inputs, masks, target = batch(data)
    out = model(inputs, masks)
    loss = method.loss(out, target, data.task.loss(out.prediction, target))
    # encoder of modality a gets gradient from its own head only: independent of modality b's input
    g = torch.autograd.grad(loss, list(model.encoders[data.modalities[0]].parameters()))
    inputs2 = dict(inputs)
    inputs2[data.modalities[1]] = torch.randn_like(inputs[data.modalities[1]])
    out2 = model(inputs2, masks)
    g2 = torch.autograd.grad(method.loss(out2, target, data.task.loss(out2.prediction, target)),
                             list(model.encoders[data.modalities[0]].parameters()))
    for a, b in zip(g, g2):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        out = model(inputs, masks)
        expected = (method.heads.modules[0](out.features[0]) + method.heads.modules[1](out.features[1])) / 2
        torch.testing.assert_close(method.eval_prediction(out), expected)


def test_qmf_energy_weighted_fusion():
    z1 = torch.tensor([[2.0, 0.0], [0.0, 0.1]])
    z2 = torch.tensor([[0.0, 5.0], [1.0, 0.0]])
    fused, conf = qmf_fuse([z1, z2], temperature=10.0)
    w1 = torch.logsumexp(z1, 1) / 10
    w2 = torch.logsumexp(z2, 1) / 10
    torch.testing.assert_close(fused, w1[:, None] * z1 + w2[:, None] * z2)
    # the more confident modality (higher logsumexp) dominates the first sample
    assert fused[0].argmax() == 1
    data = tiny_data(2)
    model = tiny_model(data)
    method = build_method("qmf", rank_weight=0.0).bind(model, data.task, data.modalities)
    inputs, masks, target = batch(data)
    out = model(inputs, masks)
    loss = method.loss(out, target, data.task.loss(out.prediction, target))
    zs = [method.heads.modules[i](h) for i, h in enumerate(out.features)]
    f, _ = qmf_fuse(zs)
    torch.testing.assert_close(loss, F.cross_entropy(f, target) + sum(F.cross_entropy(z, target) for z in zs))
    with torch.no_grad():
        torch.testing.assert_close(method.eval_prediction(out), qmf_fuse([z.detach() for z in zs])[0])


def test_reconboost_stage_trains_one_learner_against_the_others():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    others = torch.tensor([[3.0, 0.0], [0.0, -3.0]])
    y = torch.tensor([0, 1])
    loss = reconboost_loss(z, others, y, w1=5.0, w2=1.0)
    logp = F.log_softmax(z, 1)[torch.arange(2), y]
    q = F.softmax(others, 1)[torch.arange(2), y]
    torch.testing.assert_close(loss, -5 * logp.mean() + (q * logp).mean())
    data = tiny_data(3)
    model = tiny_model(data)
    method = build_method("reconboost", stage_steps=1).bind(model, data.task, data.modalities)
    opt = make_optimizer(model, method)
    method.begin_epoch(context(data, model, 0))
    for step in range(4):
        active = data.modalities[method.active]
        before = {m: [p.detach().clone() for p in model.encoders[m].parameters()] for m in data.modalities}
        train_step(model, method, opt, *batch(data, start=8 * step))
        for m in data.modalities:
            moved = any(not torch.equal(a, p) for a, p in zip(before[m], model.encoders[m].parameters()))
            assert moved == (m == active), (step, m)
    assert method.stage == 4 and "L_ga" in method.records()  # second round: reconcilement term on
    with torch.no_grad():
        out = model(*batch(data)[:2])
        torch.testing.assert_close(method.eval_prediction(out),
                                   sum(method.heads.modules[i](h) for i, h in enumerate(out.features)))


def test_mrd_drop_rate():
    data = tiny_data(3)
    model = tiny_model(data)
    torch.manual_seed(0)
    n = 20000
    inputs = {m: torch.ones(n, 4) for m in data.modalities}
    method = build_method("mrd", p=0.4, keep_one=False).bind(model, data.task, data.modalities)
    out, _ = method.prepare(inputs, {})
    dropped = torch.stack([(out[m] == 0).all(1) for m in data.modalities], 1).float()
    assert abs(dropped.mean().item() - 0.4) < 0.01
    method = build_method("mrd", p=0.4).bind(model, data.task, data.modalities)
    out, _ = method.prepare(inputs, {})
    dropped = torch.stack([(out[m] == 0).all(1) for m in data.modalities], 1).float()
    assert dropped.all(1).sum() == 0  # never every modality
    assert abs(dropped.mean().item() - (0.4 - 0.4 ** 3 / 3)) < 0.01
    ev, _ = method.prepare_eval(inputs, {})
    assert all(torch.equal(ev[m], inputs[m]) for m in data.modalities)


def test_mslr_param_groups_and_updates():
    data = tiny_data(2)
    model = tiny_model(data)
    a, b = data.modalities
    method = build_method("mslr", lr_scales={a: 2.0, b: 0.5}, dynamic=False).bind(model, data.task, data.modalities)
    groups = method.param_groups(model)
    assert [g["lr_scale"] for g in groups] == [2.0, 0.5, 1.0]
    opt = make_optimizer(model, method, lr=0.1, kind="sgd")
    method.begin_epoch(context(data, model, 0))
    inputs, masks, target = batch(data)
    out = model(inputs, masks)
    grads = torch.autograd.grad(data.task.loss(out.prediction, target), list(model.parameters()))
    grads = {id(p): g for p, g in zip(model.parameters(), grads)}
    before = {id(p): p.detach().clone() for p in model.parameters()}
    train_step(model, method, opt, inputs, masks, target)
    for m, lr in ((a, 0.2), (b, 0.05)):
        for p in model.encoders[m].parameters():
            torch.testing.assert_close(p.detach(), before[id(p)] - lr * grads[id(p)])
    for p in model.head.parameters():
        torch.testing.assert_close(p.detach(), before[id(p)] - 0.1 * grads[id(p)])


def test_mslr_dynamic_multiplier():
    data = tiny_data(2)
    model = tiny_model(data)
    method = build_method("mslr", window=2).bind(model, data.task, data.modalities)
    accs = iter([[0.5, 0.4], [0.6, 0.2], [0.9, 0.3]])
    method.unimodal_accuracy = lambda ctx: next(accs)
    for e in range(3):
        method.finish_epoch(context(data, model, e))
    # epoch 1: c = acc1 / acc0; epoch 2: c *= acc2 / mean(acc0, acc1)
    exp = [0.6 / 0.5 * 0.9 / 0.55, 0.2 / 0.4 * 0.3 / 0.3]
    assert method.multipliers == pytest.approx(exp)
    with pytest.raises(UnsupportedSettingError):
        build_method("mslr").bind(model, Task("regression", 1), data.modalities)
