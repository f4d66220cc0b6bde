"""Diagnosing & Re-learning against the spec (methods-balancemm.md section 8 (h)), recomputed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import batch, context, make_optimizer, tiny_data, tiny_model, train_step

from cggm.methods import build_method
from cggm.methods.relearning import kmeans, minmax_scale, purity


def _blobs(n_per=40, centres=((0.0, 0.0), (6.0, 0.0), (0.0, 6.0)), seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.tensor(c) + 0.3 * torch.randn(n_per, 2, generator=g) for c in centres]
    return torch.cat(xs).double(), torch.arange(len(centres)).repeat_interleave(n_per)


def _same_partition(a, b):
    """Two labelings are the same partition (equal up to renaming the clusters)."""
    a, b = a.tolist(), b.tolist()
    pairs = set(zip(a, b))
    return len(pairs) == len(set(a)) == len(set(b))


def test_kmeans_on_a_clustering_computed_by_hand():
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0], [11.0, 0.5], [0.0, 20.0]])
    labels, centres, inertia = kmeans(x, 3, seed=0)
    # by hand: {0,1}, {2,3,4}, {5}; centres (0,.5), (31/3,.5), (0,20)
    assert _same_partition(labels, torch.tensor([0, 0, 1, 1, 1, 2]))
    hand = 2 * 0.25 + ((10 - 31 / 3) ** 2 * 2 + (11 - 31 / 3) ** 2) + 2 * 0.25 + 0.0
    assert math.isclose(inertia, hand, rel_tol=1e-9)
    # seeded: the same call gives the same result
    assert torch.equal(kmeans(x, 3, seed=0)[0], labels)


def test_kmeans_matches_scikit_learn_on_blobs():
    sk = pytest.importorskip("sklearn.cluster")
    for seed in range(3):
        x, _ = _blobs(seed=seed, centres=((0.0, 0.0), (4.0, 0.0), (0.0, 4.0), (4.0, 4.0)))
        ours, _, inertia = kmeans(x, 4, seed=0)
        ref = sk.KMeans(n_clusters=4, n_init=10, random_state=0).fit(x.numpy())
        assert _same_partition(ours, torch.as_tensor(ref.labels_))
        assert math.isclose(inertia, float(ref.inertia_), rel_tol=1e-9)


def test_purity_by_hand_separated_and_random():
    assert purity(torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 1, 1, 0])) == pytest.approx(3 / 5)
    x, y = _blobs()
    assert purity(kmeans(minmax_scale(x), 3)[0], y) == 1.0  # perfectly separated clusters
    g = torch.Generator().manual_seed(1)
    xr, yr = torch.randn(2000, 4, generator=g).double(), torch.randint(0, 4, (2000,), generator=g)
    assert abs(purity(kmeans(minmax_scale(xr), 4, n_init=2)[0], yr) - 0.25) < 0.04  # about 1/C


def test_minmax_scale_by_hand():
    x = torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [2.0, 5.0, 0.0]])
    expected = torch.tensor([[-1.0, -1.0, 0.0], [1.0, -1.0, 1.0], [0.0, -1.0, -1.0]])
    torch.testing.assert_close(minmax_scale(x), expected)


def _encode_split(model, ds, modalities):
    model.eval()
    with torch.no_grad():
        inputs, masks, y = ds.get_batch(torch.arange(len(ds)))
        feats = model.encode(inputs, masks)
    model.train()
    return [f.double() for f in feats], y


def test_reinit_is_the_convex_combination_of_encoders_only_at_due_epochs():
    data = tiny_data(2)
    model = tiny_model(data)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = build_method("relearning", lam=3.0, every=2, times=2).bind(model, data.task, data.modalities)
    opt = make_optimizer(model, method, lr=5e-2)
    encoder = {id(p) for ps in model.modality_parameters().values() for p in ps}
    modality_of = {id(p): i for i, m in enumerate(data.modalities) for p in model.modality_parameters()[m]}
    fired = []
    for epoch in range(7):
        ctx = context(data, model, epoch)
        method.begin_epoch(ctx)
        for s in range(2):
            train_step(model, method, opt, *batch(data, start=16 * s))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        # the diagnosis by hand: features of the whole splits from model.encode, scaled, clustered
        ref = []
        for ds in (data.train, data.val):
            feats, y = _encode_split(model, ds, data.modalities)
            ref.append([purity(kmeans(minmax_scale(f), data.task.num_outputs, seed=0)[0], y) for f in feats])
        method.finish_epoch(ctx)
        changed = any(not torch.equal(before[n], p) for n, p in model.named_parameters())
        for n, b in model.named_buffers():
            assert torch.equal(buffers[n], b)
        if epoch not in (2, 4):
            assert not changed, epoch
            continue
        fired.append(epoch)
        d = method.diagnoses[-1]
        assert d["purity_train"] == pytest.approx(ref[0]) and d["purity_heldout"] == pytest.approx(ref[1])
        alpha = [math.tanh(3.0 * abs(a - b)) for a, b in zip(ref[0], ref[1])]
        assert d["alpha"] == pytest.approx(alpha)
        for n, p in model.named_parameters():
            if id(p) in encoder:
                a = alpha[modality_of[id(p)]]
                torch.testing.assert_close(p.detach(), a * theta0[n] + (1 - a) * before[n], rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(p.detach(), before[n]), n  # head untouched
    assert fired == [2, 4] and method.reinits == 2


def test_relearning_changes_training_vs_joint():
    from cggm.training.trainer import TrainConfig, Trainer

    data = tiny_data(2)
    finals = {}
    for name, opts in (("joint", {}), ("relearning", {"every": 1, "times": 1, "lam": 3.0})):
        model = tiny_model(data)
        result = Trainer(model, build_method(name, **opts), data,
                         TrainConfig(epochs=3, batch_size=32, progress=False)).fit()
        finals[name] = result.extra["final_weights"]
    assert any(not torch.equal(finals["joint"][k], finals["relearning"][k]) for k in finals["joint"])
