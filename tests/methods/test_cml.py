"""CML against the equations (spec methods-balancemm.md section 6 (h)), recomputed by hand."""

from __future__ import annotations

import math

import torch
from helpers import batch, make_optimizer, tiny_data, train_step
from test_mmcosine import linear_model

from cggm.methods import build_method
from cggm.methods.cml import cml_rank_bmm, cml_rank_official, level_logits


def _probs(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def hand_rank_official(levels, y, eps=0.0):
    total = 0.0
    for i in range(len(y)):
        for lv in range(len(levels) - 1):
            p0, p1 = _probs(levels[lv][i]), _probs(levels[lv + 1][i])
            c0, c1 = max(p0), max(p1)
            r0, r1 = p0.index(c0) == y[i], p1.index(c1) == y[i]
            if r0:
                total += max(0.0, c1 - c0 - eps)
            else:
                total += max(0.0, -eps)
            if not r0 and not r1:
                total += max(0.0, c1 - c0 - eps)
            else:
                total += max(0.0, -eps)
    return total


def test_zero_filled_levels_equal_subtraction_for_linear_head():
    data = tiny_data(3)
    widths = (5, 7, 3)
    model = linear_model(data, widths=widths)
    inputs, masks, target = batch(data, size=6)
    out = model(inputs, masks)
    order = torch.tensor([[0, 1, 2], [2, 0, 1], [1, 2, 0], [0, 2, 1], [2, 1, 0], [1, 0, 2]])
    levels = level_logits(model, out, order)
    W = model.head.weight.detach()
    cols = [slice(0, 5), slice(5, 12), slice(12, 15)]
    contrib = [out.features[m].detach() @ W[:, cols[m]].t() for m in range(3)]
    for lv in range(3):
        for i in range(6):
            expect = out.prediction[i].detach().clone()
            for m in order[i, :lv].tolist():
                expect = expect - contrib[m][i]  # BalanceMM: z^(l) = z^(l-1) - W_m h_m
            torch.testing.assert_close(levels[lv][i].detach(), expect, rtol=1e-5, atol=1e-5)


def test_official_rank_equals_loop_and_gating_truth_table():
    # sample 0: level 0 right, confidence rises (penalised); sample 1: both wrong, rises (penalised, sg);
    # sample 2: level 0 wrong, level 1 right, rises (not penalised); sample 3: right, falls (0)
    l0 = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [3.0, 0.0, 0.0]]
    l1 = [[4.0, 0.0, 0.0], [0.0, 3.0, 0.0], [3.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    y = [0, 0, 0, 0]
    z0, z1 = torch.tensor(l0, requires_grad=True), torch.tensor(l1, requires_grad=True)
    rank = cml_rank_official([z0, z1], torch.tensor(y))
    torch.testing.assert_close(rank, torch.tensor(hand_rank_official([l0, l1], y)))
    c = [max(_probs(r)) for r in l0], [max(_probs(r)) for r in l1]
    torch.testing.assert_close(rank, torch.tensor((c[1][0] - c[0][0]) + (c[1][1] - c[0][1])))
    g0, g1 = torch.autograd.grad(rank, [z0, z1])
    assert g0[1].abs().sum() == 0  # both wrong: no gradient into the superset's confidence (sg)
    assert g0[0].abs().sum() > 0 and g1[1].abs().sum() > 0
    assert g0[2].abs().sum() == 0 and g1[2].abs().sum() == 0 and g1[3].abs().sum() == 0
    # eps shifts every hinge
    torch.testing.assert_close(cml_rank_official([z0, z1], torch.tensor(y), 0.05),
                               torch.tensor(hand_rank_official([l0, l1], y, 0.05)))
    # zero when every reduced confidence is lower
    assert cml_rank_official([z1, z0 * 0], torch.tensor(y)) == 0


def test_bmm_rank_is_hinge_on_batch_sum():
    l0 = [[2.0, 0.0], [0.0, 3.0]]
    l1 = [[4.0, 0.0], [0.0, 0.5]]
    c0 = [max(_probs(r)) for r in l0]
    c1 = [max(_probs(r)) for r in l1]
    expected = max(0.0, sum(c1) - sum(c0))  # one sample's rise cancels against the other's fall
    torch.testing.assert_close(cml_rank_bmm([torch.tensor(l0), torch.tensor(l1)]), torch.tensor(expected))
    assert expected == 0.0 and cml_rank_official([torch.tensor(l0), torch.tensor(l1)], torch.tensor([0, 1])) > 0


def test_total_loss_is_level_mean_ce_plus_lam_rank():
    for variant in ("official", "bmm"):
        data = tiny_data(3)
        model = linear_model(data)
        method = build_method("cml", lam=0.3, variant=variant, seed=5).bind(model, data.task, data.modalities)
        inputs, masks, target = batch(data, size=8)
        out = model(inputs, masks)
        loss = method.loss(out, target, data.task.loss(out.prediction, target))
        order = method.last_order
        assert sorted(order[0].tolist()) == [0, 1, 2]
        if variant == "bmm":
            assert (order == order[0]).all()  # one order for every sample
        else:
            assert len({tuple(r) for r in order.tolist()}) > 1
        # levels by hand: subtract each removed modality's block of the linear head
        W = model.head.weight.detach()
        cols = [slice(0, 5), slice(5, 12), slice(12, 15)]
        z = out.prediction.detach()
        levels = [z.tolist()]
        for lv in (1, 2):
            rows = []
            for i in range(8):
                r = z[i].clone()
                for m in order[i, :lv].tolist():
                    r = r - out.features[m][i].detach() @ W[:, cols[m]].t()
                rows.append(r.tolist())
            levels.append(rows)
        y = target.tolist()
        ce = sum(-math.log(_probs(lvl[i])[y[i]]) for lvl in levels for i in range(8)) / 8 / 3
        if variant == "official":
            rank = hand_rank_official(levels, y)
        else:
            conf = [[max(_probs(r)) for r in lvl] for lvl in levels]
            rank = sum(max(0.0, sum(conf[lv]) - sum(conf[lv - 1])) for lv in (1, 2))
        torch.testing.assert_close(loss, torch.tensor(ce + 0.3 * rank), rtol=1e-5, atol=1e-5)


def test_bmm_order_fixed_within_epoch_changes_across_epochs():
    data = tiny_data(3)
    model = linear_model(data)
    method = build_method("cml", variant="bmm", seed=1).bind(model, data.task, data.modalities)
    orders = []
    for epoch in range(6):
        method.epoch = epoch
        a = method.removal_order(4, torch.device("cpu"))
        assert torch.equal(a, method.removal_order(4, torch.device("cpu")))
        orders.append(tuple(a[0].tolist()))
    assert len(set(orders)) > 1


def test_changes_training_vs_joint():
    data = tiny_data(2)
    results = []
    for name in ("joint", "cml"):
        model = linear_model(data, widths=(5, 7))
        method = build_method(name).bind(model, data.task, data.modalities)
        opt = make_optimizer(model, method, kind="sgd")
        train_step(model, method, opt, *batch(data))
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(results[0], results[1])
