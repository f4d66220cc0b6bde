"""Sample-/modality-level valuation against the spec (methods-balancemm.md section 9 (h)), recomputed by hand."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import batch, context, make_optimizer, tiny_data, tiny_model, train_step

from cggm.methods import UnsupportedSettingError, build_method
from cggm.methods.valuation import copy_counts, enhancement_ratio, sample_contributions

# (a right, v right, fused right) -> (copies keeping a, copies keeping v), by hand from
# phi_a = 1/2 a + 1/2 (2 f - v), phi_v = 1/2 v + 1/2 (2 f - a) and the thresholds 1, 0.4, -0.1
HAND_TABLE = {(0, 0, 0): (2, 2), (0, 0, 1): (0, 0), (1, 0, 0): (1, 3), (1, 0, 1): (0, 1),
              (0, 1, 0): (3, 1), (0, 1, 1): (1, 0), (1, 1, 0): (2, 2), (1, 1, 1): (0, 0)}


def test_two_modality_closed_form_and_the_eight_patterns():
    pats = list(HAND_TABLE)
    a, v, f = (torch.tensor([p[k] for p in pats], dtype=torch.bool) for k in range(3))
    phi = sample_contributions({frozenset("a"): a, frozenset("v"): v, frozenset("av"): f}, ["a", "v"])
    for i, (ai, vi, fi) in enumerate(pats):
        assert phi["a"][i].item() == 0.5 * ai + 0.5 * (2 * fi - vi)
        assert phi["v"][i].item() == 0.5 * vi + 0.5 * (2 * fi - ai)
        assert phi["a"][i].item() + phi["v"][i].item() == 2 * fi  # efficiency: v(all) - v(empty)
        assert (copy_counts(phi["a"])[i].item(), copy_counts(phi["v"])[i].item()) == HAND_TABLE[pats[i]]


def test_general_m_is_the_permutation_average_bmm_scale():
    g = torch.Generator().manual_seed(0)
    players = ["a", "b", "c"]
    correct = {frozenset(s): torch.rand(16, generator=g) < 0.5
               for k in (1, 2, 3) for s in itertools.combinations(players, k)}
    phi = sample_contributions(correct, players, scale="one")

    def v(s, i):
        return float(correct[frozenset(s)][i]) if s else 0.0

    for i in range(16):
        for m in players:
            marg = [v(set(o[:o.index(m) + 1]), i) - v(set(o[:o.index(m)]), i) for o in itertools.permutations(players)]
            assert phi[m][i].item() == pytest.approx(sum(marg) / 6)
        assert sum(phi[m][i].item() for m in players) == pytest.approx(v(players, i))


def test_delta_by_hand():
    assert enhancement_ratio(torch.tensor([0.2, 0.8]), "official", alpha=1.0) == pytest.approx(2 / 3 * 0.6)
    assert enhancement_ratio(torch.tensor([0.2, 0.8]), "official", alpha=0.5) == pytest.approx(1 / 3 * 0.6)
    # BalanceMM: ordered pairs over M - 1, no alpha
    gaps = [0.1, 0.4, 0.9]
    hand = sum(abs(x - y) for x in gaps for y in gaps) / 2
    assert enhancement_ratio(torch.tensor(gaps), "bmm") == pytest.approx(hand)


def _hand_ce(z, y):
    return -math.log(math.exp(z[y]) / sum(math.exp(t) for t in z))


def test_sample_level_loss_by_hand():
    data = tiny_data(2)
    model = tiny_model(data)
    method = build_method("valuation", warmup=0).bind(model, data.task, data.modalities)
    method.begin_epoch(context(data, model, 0))
    inputs, masks, target = batch(data, size=32)
    out = model(inputs, masks)
    feats = [h.detach() for h in out.features]
    with torch.no_grad():
        z_full = model.predict(feats).tolist()
        z_a = model.predict([feats[0], torch.zeros_like(feats[1])]).tolist()  # only a kept
        z_v = model.predict([torch.zeros_like(feats[0]), feats[1]]).tolist()
    y = target.tolist()
    total, n, expected_counts = 0.0, len(y), ([], [])
    for i in range(len(y)):
        right = [int(max(range(len(z[i])), key=z[i].__getitem__) == y[i]) for z in (z_a, z_v, z_full)]
        ca, cv = HAND_TABLE[tuple(right)]
        expected_counts[0].append(ca)
        expected_counts[1].append(cv)
        total += _hand_ce(z_full[i], y[i]) + ca * _hand_ce(z_a[i], y[i]) + cv * _hand_ce(z_v[i], y[i])
        n += ca + cv
    assert n > len(y), "the batch should produce copies"
    loss = method.loss(out, target, data.task.loss(out.prediction, target))
    assert loss.item() == pytest.approx(total / n, rel=1e-5)
    got = [torch.bincount(idx, minlength=32).tolist() for idx, _ in method.last_copies]
    assert [keep for _, keep in method.last_copies] == [(0,), (1,)]
    assert got == [expected_counts[0], expected_counts[1]]
    loss.backward()
    method.skip()
    # before the warm-up ends: plain cross-entropy
    late = build_method("valuation").bind(model, data.task, data.modalities)
    late.begin_epoch(context(data, model, 4))
    out = model(inputs, masks)
    task_loss = data.task.loss(out.prediction, target)
    assert late.loss(out, target, task_loss) is task_loss
    late.skip()


def test_modality_level_valuation_and_copies_by_hand():
    data = tiny_data(2)
    model = tiny_model(data)
    method = build_method("valuation", level="modality", warmup=1, seed=7).bind(model, data.task, data.modalities)
    opt = make_optimizer(model, method)
    ctx = context(data, model, 0)
    method.begin_epoch(ctx)
    for s in range(6):
        train_step(model, method, opt, *batch(data, start=16 * (s % 3)))
    assert method.last_copies == []  # epoch 0 < warmup
    method.finish_epoch(ctx)  # epoch 0 = warmup - 1: valued
    # by hand: eval-mode contributions of the whole training split, the seeded draw of rho N samples
    model.eval()
    with torch.no_grad():
        inputs, masks, y = data.train.get_batch(torch.arange(len(data.train)))
        h = model.encode(inputs, masks)
        right = [(model.predict(k).argmax(1) == y).double() for k in
                 ([h[0], torch.zeros_like(h[1])], [torch.zeros_like(h[0]), h[1]], h)]
    model.train()
    phi_a = 0.5 * right[0] + 0.5 * (2 * right[2] - right[1])
    phi_v = 0.5 * right[1] + 0.5 * (2 * right[2] - right[0])
    g = torch.Generator().manual_seed(7)
    drawn = torch.randint(64, (int(0.2 * 64),), generator=g)
    gap = [1 - phi_a[drawn].mean().item(), 1 - phi_v[drawn].mean().item()]
    assert method.contributions == pytest.approx([1 - gap[0], 1 - gap[1]])
    assert method.delta == pytest.approx(2 / 3 * abs(gap[0] - gap[1]))
    assert gap[0] != gap[1], "pick a setting where the modalities differ"
    weak = 0 if gap[0] > gap[1] else 1
    assert method.keep_sets == [[weak]]
    # the next epoch: about delta * B copies per batch keeping only the weak modality; loss by hand
    method.begin_epoch(context(data, model, 1))
    method.delta = 0.25  # (a known ratio: 8 copies of a 32-sample batch)
    inputs, masks, target = batch(data, size=32)
    out = model(inputs, masks)
    loss = method.loss(out, target, data.task.loss(out.prediction, target))
    (idx, keep), = method.last_copies
    assert keep == (weak,) and idx.numel() == 8
    feats = [f.detach() for f in out.features]
    only = [f if j == weak else torch.zeros_like(f) for j, f in enumerate(feats)]
    with torch.no_grad():
        z, zc = model.predict(feats).tolist(), model.predict(only).tolist()
    yl = target.tolist()
    hand = (sum(_hand_ce(z[i], yl[i]) for i in range(32)) + sum(_hand_ce(zc[i], yl[i]) for i in idx.tolist())) / 40
    assert loss.item() == pytest.approx(hand, rel=1e-5)
    method.skip()


def test_bmm_variant_keep_sets_and_official_refuses_three_modalities():
    data3 = tiny_data(3)
    with pytest.raises(UnsupportedSettingError, match="two-modality"):
        build_method("valuation").bind(tiny_model(data3), data3.task, data3.modalities)
    model = tiny_model(data3)
    method = build_method("valuation", level="modality", variant="bmm", warmup=0).bind(model, data3.task, data3.modalities)
    method.begin_epoch(context(data3, model, 0))
    method.finish_epoch(context(data3, model, 0))
    gaps = [1 - c for c in method.contributions]
    assert method.keep_sets == [[j for j in range(3) if gaps[j] >= gaps[m]] for m in range(3)]
    assert method.delta == pytest.approx(sum(abs(x - y) for x in gaps for y in gaps) / 2)


def test_valuation_changes_training_vs_joint():
    from cggm.training.trainer import TrainConfig, Trainer

    data = tiny_data(2)
    finals = {}
    for name, opts in (("joint", {}), ("valuation", {"warmup": 1})):
        model = tiny_model(data)
        result = Trainer(model, build_method(name, **opts), data,
                         TrainConfig(epochs=2, batch_size=32, progress=False)).fit()
        finals[name] = result.extra["final_weights"]
    assert any(not torch.equal(finals["joint"][k], finals["valuation"][k]) for k in finals["joint"])
