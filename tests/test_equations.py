"""CGGM's equations pinned on fixed tensors (Eq. 7, 8, 12, 13) and the robust rule's bounds."""

import copy
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


def test_underuse_rule_matches_formula_bounds_and_steers_by_level():
    from cggm.methods import UnderuseRule

    rho, T = 1.3, 0.05
    rule = UnderuseRule(rho, beta=0.0, temperature=T)  # beta = 0: the level is the last metric
    eps = torch.tensor([0.9, 0.5, 0.7])
    B = rule(eps)
    z = -(eps - eps.mean()) / T
    expected = rho * 2 * torch.exp(z) / torch.exp(z).sum()
    torch.testing.assert_close(B, expected)
    assert float(B[1]) > float(B[2]) > float(B[0])  # the lowest level gets the largest factor
    assert math.isclose(float(B.sum()), rho * 2, rel_tol=1e-5)
    assert torch.allclose(UnderuseRule(rho)(torch.tensor([0.4, 0.4])), torch.full((2,), rho / 2))
    # unlike Eq. 7: a converged strong modality (flat at 0.9) and a weak one still improving
    # (0.3 -> 0.5): the robust rule gives the larger B to the converged one, this rule to the weak
    robust, under = RobustRule(rho, beta=0.0, window=1), UnderuseRule(rho, beta=0.0, temperature=T)
    for weak in (0.3, 0.4, 0.5):
        Br, Bu = robust(torch.tensor([0.9, weak])), under(torch.tensor([0.9, weak]))
    assert float(Br[0]) > float(Br[1]) and float(Bu[1]) > float(Bu[0])
    for bad in ({"temperature": 0.0}, {"beta": 1.0}):
        with pytest.raises(ValueError):
            UnderuseRule(rho, **bad)


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


# -- CGGM in a step: every reference recomputed outside the method --------------------------------
#
# The references below never read the method's internal state. They rebuild each quantity from
# copies taken before the step: the classifiers' metric and last-layer gradient from deep copies
# of the classifiers, the head's gradient from a deep copy of the model, and B from Eq. 7 (or the
# robust rule's closed form with beta = 0, window = 1) on those metrics.


def tiny_model(dims=(5, 7), out=3):
    enc = {f"m{i}": MLPEncoder(d, 8, 16) for i, d in enumerate(dims)}
    return LateFusionModel(enc, ConcatFusion(), Head(8 * len(dims), out, 12))


def batch(dims=(5, 7), n=16, out=3, seed=None):
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return ({f"m{i}": torch.randn(n, d, generator=g) for i, d in enumerate(dims)},
            torch.randint(0, out, (n,), generator=g))


class Clf(nn.Module):
    """A user classifier (Linear-ReLU-Linear with the `last` layer CGGM compares)."""

    def __init__(self, d_in=8, hidden=12, out=3):
        super().__init__()
        self.hidden, self.last = nn.Linear(d_in, hidden), nn.Linear(hidden, out)

    def forward(self, h, mask=None, size=None):
        return self.last(torch.relu(self.hidden(h)))


def make_cggm(model, M, **options):
    torch.manual_seed(10)
    clfs = [Clf() for _ in range(M)]
    options.setdefault("classifier_lr", 0.05)  # so that the classifiers' metrics move between steps
    return CGGM(classifiers=clfs, **options).bind(model, Task("classification", 3)), clfs


def ref_classifiers(clfs, features, y):
    """Accuracy and last-layer gradient of each classifier copy on detached features."""
    eps, grads = [], []
    for clf, h in zip(clfs, features):
        pred = clf(h.detach())
        eps.append((pred.argmax(1) == y).float().mean())
        grads.append(torch.autograd.grad(nn.functional.cross_entropy(pred, y), clf.last.weight)[0])
    return torch.stack(eps), grads


def robust01(prev, now, rho, tau):
    """The robust rule's B for beta = 0, window = 1: Eq. 7 on max(eps_t - eps_{t-1}, 0) + tau/M."""
    d = (now - prev).clamp_min(0)
    s, m = d.sum(), now.numel()
    return rho * (s - d + tau * (m - 1) / m) / (s + tau)


def one_step(model, method, opt, x, y):
    task = method.task
    out = model(x)
    loss = method.loss(out, y, task.loss(out.prediction, y))
    opt.zero_grad()
    method.backward(loss)
    method.step(opt)


@pytest.mark.parametrize("rule", ["paper", "robust"])
def test_lgm_and_its_gradient_match_an_independent_recomputation(rule):
    """Eq. 7 and Eq. 12-13 at step 2, recomputed from copies: metrics and gradients of the
    classifiers (not their weights), rho included in B, L_gm's gradient on W_F in the same step."""
    torch.manual_seed(0)
    task, rho, lam = Task("classification", 3), 1.7, 1.0
    model = tiny_model()
    options = {"rule_options": {"beta": 0.0, "window": 1, "tau": 0.01}} if rule == "robust" else {}
    method, clfs = make_cggm(model, 2, rho=rho, lam=lam, magnitude=False, rule=rule, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x1, y1 = batch(seed=1)
    with torch.no_grad():
        feats1 = model(x1).features
    eps1, _ = ref_classifiers(copy.deepcopy(clfs), feats1, y1)
    one_step(model, method, opt, x1, y1)

    x2, y2 = x1, y1  # the classifiers improved on this batch: B is not degenerate
    model_ref, clfs_ref = copy.deepcopy(model), copy.deepcopy(clfs)
    out = model(x2)
    task_loss = task.loss(out.prediction, y2)
    total = method.loss(out, y2, task_loss)
    g_total = torch.autograd.grad(total, model.head_layer.weight, retain_graph=True)[0]

    out_r = model_ref(x2)
    loss_r = task.loss(out_r.prediction, y2)
    g_F = torch.autograd.grad(loss_r, model_ref.head_layer.weight, create_graph=True)[0]
    eps2, g_clf = ref_classifiers(clfs_ref, out_r.features, y2)
    if rule == "paper":
        B = torch.tensor(eq7(rho, (eps2 - eps1).tolist()))
    else:
        B = robust01(eps1, eps2, rho, 0.01)
    cos = torch.stack([nn.functional.cosine_similarity(g_F.flatten(), g.flatten(), dim=0) for g in g_clf])
    l_gm = (B.abs() - B * cos).mean()
    g_ref = torch.autograd.grad(loss_r + lam * l_gm, model_ref.head_layer.weight)[0]

    rec = method.records()
    torch.testing.assert_close(torch.stack([rec["eps/m0"], rec["eps/m1"]]), eps2)
    torch.testing.assert_close(torch.stack([rec["B/m0"], rec["B/m1"]]), B, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rec["L_gm"], l_gm.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_total, g_ref, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(g_total, torch.autograd.grad(task_loss, model.head_layer.weight)[0])


@pytest.mark.parametrize("M", [2, 3, 4])
def test_encoder_gradient_is_exactly_B_times_unmodulated_after_backward(M):
    """Eq. 8 with B on gradients: right after method.backward (so before any clipping), each
    encoder's gradient is B_i times the plain gradient of a copy of the model; fusion and head are
    unscaled. B is the robust rule's closed form on metrics recomputed from classifier copies."""
    dims = tuple(range(4, 4 + M))
    task, rho = Task("classification", 3), 1.3
    torch.manual_seed(1)
    model = tiny_model(dims)
    method, clfs = make_cggm(model, M, lam=0.0, direction="off", scale_on="gradient", rho=rho,
                             rule_options={"beta": 0.0, "window": 1, "tau": 0.01})
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x1, y1 = batch(dims, seed=3)
    with torch.no_grad():
        feats1 = model(x1).features
    eps1, _ = ref_classifiers(copy.deepcopy(clfs), feats1, y1)
    one_step(model, method, opt, x1, y1)

    x, y = x1, y1  # the classifiers improved on this batch: B is not uniform
    twin, clfs_ref = copy.deepcopy(model), copy.deepcopy(clfs)
    out_t = twin(x)
    eps2, _ = ref_classifiers(clfs_ref, out_t.features, y)
    B = robust01(eps1, eps2, rho, 0.01)
    assert B.max() - B.min() > 1e-3  # not uniform: the test can tell modalities apart
    task.loss(out_t.prediction, y).backward()

    out = model(x)
    loss = method.loss(out, y, task.loss(out.prediction, y))
    opt.zero_grad()
    method.backward(loss)
    for (name, p), pt in zip(model.named_parameters(), twin.parameters()):
        if name.startswith("encoders."):
            i = model.modalities.index(name.split(".")[1])
            torch.testing.assert_close(p.grad, B[i] * pt.grad, rtol=1e-5, atol=1e-7, msg=name)
        else:
            torch.testing.assert_close(p.grad, pt.grad, rtol=1e-5, atol=1e-7, msg=name)  # fusion and head


def test_update_scaling_multiplies_each_encoder_update_by_B():
    """Eq. 8 on updates (Adam): each encoder's update is B_i times a twin's plain Adam update. At
    the first step the robust rule's B is rho (M - 1) / M for every modality (nothing improved yet),
    at the second it is recomputed from classifier copies."""
    task, rho = Task("classification", 3), 1.3
    torch.manual_seed(2)
    model = tiny_model()
    twin = copy.deepcopy(model)
    method, clfs = make_cggm(model, 2, lam=0.0, direction="off", scale_on="update", rho=rho, classifier_lr=0.2,
                             rule_options={"beta": 0.0, "window": 1, "tau": 0.01})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt_twin = torch.optim.Adam(twin.parameters(), lr=1e-2)
    eps_prev = None
    x, y = batch(seed=5)
    for step in range(2):
        with torch.no_grad():
            feats = model(x).features
        eps, _ = ref_classifiers(copy.deepcopy(clfs), feats, y)
        B = torch.full((2,), rho / 2) if step == 0 else robust01(eps_prev, eps, rho, 0.01)
        eps_prev = eps
        assert step == 0 or B.max() - B.min() > 1e-3  # not uniform: the test can tell modalities apart
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        twin.load_state_dict(model.state_dict())
        one_step(model, method, opt, x, y)
        out_t = twin(x)
        opt_twin.zero_grad()
        task.loss(out_t.prediction, y).backward()
        opt_twin.step()
        for (name, p), pt in zip(model.named_parameters(), twin.parameters()):
            plain_update = pt.detach() - before[name]
            upd = p.detach() - before[name]
            if name.startswith("encoders."):
                i = model.modalities.index(name.split(".")[1])
                torch.testing.assert_close(upd, B[i] * plain_update, rtol=1e-4, atol=1e-7, msg=name)
            else:
                torch.testing.assert_close(upd, plain_update, rtol=1e-4, atol=1e-7, msg=name)
        # the twin's optimizer state follows the unscaled gradients, as the method's does
        opt_twin.load_state_dict(copy.deepcopy(opt.state_dict()))


def test_classifier_losses_never_reach_encoders_and_classifiers_step_only_in_step():
    task = Task("classification", 3)
    model = tiny_model()
    method, clfs = make_cggm(model, 2, lam=0.0, direction="off", magnitude=False)
    x, y = batch()
    before = copy.deepcopy([c.state_dict() for c in clfs])
    out = model(x)
    method.loss(out, y, task.loss(out.prediction, y))
    for p in model.parameters():
        assert p.grad is None  # classifier losses never reached the model
    for c, b in zip(clfs, before):  # computing the loss does not train the classifiers
        for k, v in c.state_dict().items():
            assert torch.equal(v, b[k])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = task.loss(out.prediction, y)
    opt.zero_grad()
    method.backward(loss)
    method.step(opt)
    assert any(not torch.equal(v, before[0][k]) for k, v in clfs[0].state_dict().items())


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
            one_step(model, method, opt, x, y)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_weight_direction_is_one_step_late_and_only_on_head():
    """The official term: at step 2, the gradient of Eq. 12 on the *weights* of step 1 (head and
    classifiers, copied before step 1), with B / rho, lands on W_F only."""
    task, rho = Task("classification", 3), 1.3
    torch.manual_seed(4)
    model = tiny_model()
    method, clfs = make_cggm(model, 2, rho=rho, lam=1.0, magnitude=False, direction="weight", rule="paper")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x1, y1 = batch(seed=7)
    stale_head = model.head_layer.weight.detach().clone()
    stale_clf = [c.last.weight.detach().clone() for c in clfs]
    with torch.no_grad():
        feats1 = model(x1).features
    eps1, _ = ref_classifiers(copy.deepcopy(clfs), feats1, y1)
    out = model(x1)
    task_loss = task.loss(out.prediction, y1)
    assert method.loss(out, y1, task_loss) is task_loss  # nothing to add at the first step
    opt.zero_grad()
    method.backward(task_loss)
    method.step(opt)
    assert not torch.equal(model.head_layer.weight, stale_head)  # the head moved on

    x2, y2 = batch(seed=8)
    out = model(x2)
    task_loss = task.loss(out.prediction, y2)
    total = method.loss(out, y2, task_loss)
    grads = torch.autograd.grad(total - task_loss, list(model.parameters()), allow_unused=True)
    b = torch.tensor(eq7(rho, eps1.tolist())) / rho  # B of step 1 (eps^0 = 0), without rho
    w = stale_head.clone().requires_grad_()
    cos = torch.stack([nn.functional.cosine_similarity(w.flatten(), c.flatten(), dim=0) for c in stale_clf])
    ref = torch.autograd.grad((b.abs() - b * cos).mean(), w)[0]
    for (n, _), g in zip(model.named_parameters(), grads):
        if n == "head.out.weight":
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
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
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = CGGM(head_layer=model.fc).bind(model, task, ["audio", "video"], optimizer=opt)
    assert method.where_B_acts() == "gradient"  # SGD: Eq. 8 on gradients
    for _ in range(3):
        a, v, y = torch.randn(8, 10), torch.randn(8, 12), torch.randint(0, 4, (8,))
        pred, feats = model(a, v)
        loss = method.loss(ModelOutput(pred, feats), y, task.loss(pred, y))
        opt.zero_grad()
        method.backward(loss)
        method.step(opt)
    assert set(method.records()) >= {"B/audio", "B/video", "L_gm", "cos/audio"}
    assert method.global_step == 3


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
