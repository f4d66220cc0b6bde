"""CGGM's equations pinned on fixed tensors (Eq. 7, 8, 12, 13) and the robust rule's bounds."""

import math

import pytest
import torch
from torch import nn

from cggm import CGGM, LateFusionModel, ModelOutput, Task
from cggm.methods import PaperRule, RobustRule, gradient_modulation_loss
from cggm.models import ConcatFusion, Head, MLPEncoder


def eq7(rho, delta):
    s = sum(delta)
    return [rho * (s - d) / (s + 1e-8) for d in delta]


@pytest.mark.parametrize("eps_seq", [
    [[0.5, 0.3], [0.6, 0.35]],
    [[0.2, 0.4, 0.1], [0.5, 0.45, 0.3]],
    [[0.1, 0.2, 0.3, 0.4], [0.3, 0.25, 0.5, 0.45]],
])
def test_paper_rule_is_eq7_on_consecutive_metrics(eps_seq):
    rho = 1.3
    rule = PaperRule(rho)
    prev = [0.0] * len(eps_seq[0])  # epsilon^0 = 0 (Algorithm 1)
    for eps in eps_seq:
        B = rule(torch.tensor(eps))
        expected = eq7(rho, [e - p for e, p in zip(eps, prev)])
        assert torch.allclose(B, torch.tensor(expected), rtol=1e-5, atol=1e-6)
        assert math.isclose(float(B.sum()), rho * (len(eps) - 1), rel_tol=1e-4)  # sum_i B_i = rho (M-1)
        prev = eps


def test_paper_rule_blows_up_and_flips_sign():
    rule = PaperRule(1.0)
    rule(torch.tensor([0.50, 0.50]))
    # improvements cancel exactly: the denominator is the 1e-8 guard
    B = rule(torch.tensor([0.5625, 0.4375]))
    assert float(B.abs().max()) > 1e5
    # opposite-sign improvements with a small negative sum: B turns negative (gradient ascent)
    rule = PaperRule(1.0)
    rule(torch.tensor([0.5, 0.5]))
    B = rule(torch.tensor([0.55, 0.44]))  # delta = (+0.05, -0.06), sum = -0.01
    assert float(B.min()) < 0
    assert torch.allclose(B, torch.tensor([-0.06 / -0.01, 0.05 / -0.01]), rtol=1e-4)


def test_robust_rule_matches_formula_and_bounds():
    rule = RobustRule(rho=1.3, beta=0.0, window=1, tau=0.01)
    rule(torch.tensor([0.2, 0.2, 0.2]))
    B = rule(torch.tensor([0.5, 0.3, 0.1]))  # beta=0, window=1: delta = max(eps - prev, 0)
    delta = torch.tensor([0.3, 0.1, 0.0])
    s, m, tau = float(delta.sum()), 3, 0.01
    expected = 1.3 * (s - delta + tau * (m - 1) / m) / (s + tau)
    assert torch.allclose(B, expected, atol=1e-6)
    assert float(B[0]) < float(B[1]) < float(B[2])  # the fastest learner is slowed most


def test_robust_rule_uniform_when_nothing_improves():
    rule = RobustRule(rho=1.2, window=5)
    for _ in range(20):
        B = rule(torch.tensor([0.7, 0.4]))
    assert torch.allclose(B, torch.full((2,), 1.2 * 1 / 2), atol=1e-6)


@pytest.mark.parametrize("M", [2, 3, 4])
def test_robust_rule_stays_finite_and_bounded_over_100k_noisy_steps(M):
    g = torch.Generator().manual_seed(M)
    rho = 1.3
    rule = RobustRule(rho)
    steps = 100_000
    # batch accuracies of a 64-sample batch around drifting rates, with jumps and a stall
    rates = torch.linspace(0.1, 0.9, steps).unsqueeze(1) * torch.rand(1, M, generator=g)
    noisy = (torch.binomial(torch.full((steps, M), 64.0), rates.clamp(0, 1), generator=g) / 64)
    noisy[steps // 2: steps // 2 + 1000] = 0.0  # a collapse, then recovery
    lo, hi, worst_sum = float("inf"), -float("inf"), 0.0
    for t in range(steps):
        B = rule(noisy[t])
        lo, hi = min(lo, float(B.min())), max(hi, float(B.max()))
        worst_sum = max(worst_sum, abs(float(B.sum()) - rho * (M - 1)))
        assert torch.isfinite(B).all()
    assert lo >= 0.0 and hi <= rho + 1e-6
    assert worst_sum < 1e-4


def test_eq12_value():
    B = torch.tensor([0.4, 0.9, -0.2])
    cos = torch.tensor([0.5, -0.1, 0.3])
    expected = ((0.4 - 0.4 * 0.5) + (0.9 + 0.9 * 0.1) + (0.2 + 0.2 * 0.3)) / 3
    assert math.isclose(float(gradient_modulation_loss(B, cos)), expected, rel_tol=1e-6)
    # L_gm >= 0 for any B and any cos in [-1, 1] ("the loss L_gm is always positive"), and it is 0
    # exactly when every gradient with B_i > 0 is aligned (cos = 1) and every B_i < 0 is anti-aligned
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        b, c = torch.randn(5, generator=g), torch.rand(5, generator=g) * 2 - 1
        assert float(gradient_modulation_loss(b, c)) >= 0
    assert float(gradient_modulation_loss(B, torch.sign(B))) == 0.0
    assert float(gradient_modulation_loss(B, -torch.sign(B))) == pytest.approx(2 * float(B.abs().mean()))


def tiny_model(dims=(5, 7), out=3):
    enc = {f"m{i}": MLPEncoder(d, 8, 16) for i, d in enumerate(dims)}
    return LateFusionModel(enc, ConcatFusion(), Head(8 * len(dims), out, 12))


def batch(dims=(5, 7), n=16, out=3):
    return {f"m{i}": torch.randn(n, d) for i, d in enumerate(dims)}, torch.randint(0, out, (n,))


def test_lgm_gradient_reaches_head_in_same_step():
    torch.manual_seed(0)
    task = Task("classification", 3)
    model = tiny_model()
    x, y = batch()
    method = CGGM(lam=1.0, magnitude=False).bind(model, task)
    out = model(x)
    task_loss = task.loss(out.prediction, y)
    total = method.loss(out, y, task_loss)
    W = model.head_layer.weight
    g_total = torch.autograd.grad(total, W, retain_graph=True)[0]
    g_task = torch.autograd.grad(task_loss, W, retain_graph=True)[0]
    assert not torch.allclose(g_total, g_task)  # lambda * dL_gm/dW_F is there, in this step
    # and equals the derivative of Eq. 12 recomputed independently
    l_gm = method.records()["L_gm"]
    assert float(l_gm) > 0
    g_F = torch.autograd.grad(task_loss, W, create_graph=True)[0]
    clf_grads = method._last_clf_grads
    cos = torch.stack([torch.nn.functional.cosine_similarity(g_F.flatten(), g.flatten(), dim=0) for g in clf_grads])
    B = method._B
    ref = (B.abs() - B * cos).mean()
    assert math.isclose(float(ref.detach()), float(l_gm), rel_tol=1e-5)
    g_ref = torch.autograd.grad(task_loss + ref, W)[0]
    assert torch.allclose(g_total, g_ref, atol=1e-6)


@pytest.mark.parametrize("M", [2, 3, 4])
def test_encoder_gradient_is_exactly_B_times_unmodulated(M):
    dims = tuple(range(4, 4 + M))
    task = Task("classification", 3)
    torch.manual_seed(1)
    model = tiny_model(dims)
    x, y = batch(dims)
    method = CGGM(lam=0.0, direction="off", scale_on="gradient").bind(model, task)
    # warm the rule so B is not uniform
    for _ in range(3):
        out = model(x)
        method.loss(out, y, task.loss(out.prediction, y))
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(x)
    plain = torch.autograd.grad(task.loss(out.prediction, y), list(model.parameters()), allow_unused=True)
    out = model(x)
    loss = method.loss(out, y, task.loss(out.prediction, y))
    model.zero_grad()
    loss.backward()
    B = method._B
    params = dict(model.named_parameters())
    for (name, p), g0 in zip(params.items(), plain):
        assert torch.equal(p.detach(), ref[name])
        if name.startswith("encoders."):
            i = model.modalities.index(name.split(".")[1])
            assert torch.allclose(p.grad, B[i] * g0, rtol=1e-5, atol=1e-7), name
        else:
            assert torch.allclose(p.grad, g0, rtol=1e-5, atol=1e-7), name  # fusion and head unscaled


def test_update_scaling_multiplies_each_encoder_update_by_B():
    task = Task("classification", 3)
    torch.manual_seed(2)
    model = tiny_model()
    twin = tiny_model()
    twin.load_state_dict(model.state_dict())
    x, y = batch()
    method = CGGM(lam=0.0, direction="off", scale_on="update").bind(model, task)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt_twin = torch.optim.Adam(twin.parameters(), lr=1e-2)
    out = model(x)
    loss = method.loss(out, y, task.loss(out.prediction, y))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    method.backward(loss)
    method.step(opt)
    out_t = twin(x)
    opt_twin.zero_grad()
    task.loss(out_t.prediction, y).backward()
    opt_twin.step()
    B = method._B
    for (name, p), pt in zip(model.named_parameters(), twin.parameters()):
        plain_update = pt.detach() - before[name]
        upd = p.detach() - before[name]
        if name.startswith("encoders."):
            i = model.modalities.index(name.split(".")[1])
            assert torch.allclose(upd, B[i] * plain_update, atol=1e-7), name
        else:
            assert torch.allclose(upd, plain_update, atol=1e-7), name


def test_classifier_losses_never_reach_encoders():
    task = Task("classification", 3)
    model = tiny_model()
    x, y = batch()
    method = CGGM(lam=0.0, direction="off", magnitude=False).bind(model, task)
    out = model(x)
    method.loss(out, y, task.loss(out.prediction, y))  # trains the classifiers
    for p in model.parameters():
        assert p.grad is None
    for clf in method.classifiers:
        assert clf.last.weight.grad is not None


def test_joint_equals_cggm_with_both_modulations_off():
    from cggm.methods import Method

    task = Task("classification", 3)
    torch.manual_seed(3)
    a, b = tiny_model(), tiny_model()
    b.load_state_dict(a.state_dict())
    ma, mb = Method().bind(a, task), CGGM(magnitude=False, direction="off").bind(b, task)
    oa, ob = torch.optim.Adam(a.parameters()), torch.optim.Adam(b.parameters())
    for _ in range(5):
        x, y = batch()
        for model, method, opt in ((a, ma, oa), (b, mb, ob)):
            out = model(x)
            loss = method.loss(out, y, task.loss(out.prediction, y))
            opt.zero_grad()
            method.backward(loss)
            method.step(opt)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_weight_direction_is_one_step_late_and_only_on_head():
    task = Task("classification", 3)
    model = tiny_model()
    method = CGGM.official(lam=1.0, magnitude=False).bind(model, task)
    x, y = batch()
    out = model(x)
    task_loss = task.loss(out.prediction, y)
    assert method.loss(out, y, task_loss) is task_loss  # nothing to add at the first step
    stale_head = model.head_layer.weight.detach().clone()
    with torch.no_grad():
        model.head_layer.weight.add_(0.1)  # the head moves on
    out = model(x)
    task_loss = task.loss(out.prediction, y)
    total = method.loss(out, y, task_loss)
    grads = torch.autograd.grad(total - task_loss, list(model.parameters()), allow_unused=True)
    names = [n for n, _ in model.named_parameters()]
    for n, g in zip(names, grads):
        if n == "head.out.weight":
            # the gradient of Eq. 12 on weights, evaluated at the stale head, with B without rho
            w = stale_head.clone().requires_grad_()
            cos = torch.stack([torch.nn.functional.cosine_similarity(w.flatten(), c.flatten(), dim=0)
                               for c in method._stale_used[1]])
            ref = torch.autograd.grad(gradient_modulation_loss(method._stale_used[2], cos), w)[0]
            assert torch.allclose(g, ref, atol=1e-6)
        else:
            assert g is None or torch.count_nonzero(g) == 0, n


def test_user_model_few_lines():
    """CGGM in a user's own loop with a plain nn.Module returning (prediction, features)."""

    class MyModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.audio, self.video = nn.Linear(10, 8), nn.Linear(12, 8)
            self.fc = nn.Linear(16, 4)

        def forward(self, a, v):
            h = [torch.relu(self.audio(a)), torch.relu(self.video(v))]
            return self.fc(torch.cat(h, 1)), h

    model = MyModel()
    task = Task("classification", 4)
    method = CGGM(head_layer=model.fc, scale_on="gradient").bind(model, task, ["audio", "video"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        a, v, y = torch.randn(8, 10), torch.randn(8, 12), torch.randint(0, 4, (8,))
        pred, feats = model(a, v)
        loss = method.loss(ModelOutput(pred, feats), y, task.loss(pred, y))
        opt.zero_grad()
        method.backward(loss)
        method.step(opt)
    assert set(method.records()) >= {"B/audio", "B/video", "L_gm", "cos/audio"}


def test_head_and_classifier_shapes_must_match():
    """A fused head whose last layer is a 3x3 conv cannot be compared with the classifiers' 1x1
    layers: a clear error when the classifiers are built, not a shape error inside Eq. 12."""
    task = Task("segmentation", 3)

    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
            self.out = nn.Conv2d(8, 3, 3, padding=1)

        def forward(self, x, y):
            h = [self.a(x), self.b(y)]
            return self.out(torch.cat(h, 1)), h

    model = Seg()
    method = CGGM(head_layer=model.out, scale_on="gradient").bind(model, task, ["a", "b"])
    pred, feats = model(torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8))
    target = torch.randint(0, 3, (2, 8, 8))
    with pytest.raises(ValueError, match="last layer"):
        method.loss(ModelOutput(pred, feats), target, task.loss(pred, target))
