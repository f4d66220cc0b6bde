"""No silent wrong result: each test here failed on the code before the protocol redesign (the
trust issue) and names the item it pins. References are built outside the code under test."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _state import assert_same_state
from torch import nn

from cggm import CGGM, ModelOutput, ProtocolError, Task, build_method, list_methods
from cggm.data import load_dataset
from cggm.methods import EpochContext, PaperRule, UnsupportedSettingError
from cggm.models import build_model
from cggm.training import TrainConfig, Trainer

TASK = Task("classification", 4)


class TwoModal(nn.Module):
    """The README's user model: returns (prediction, features)."""

    def __init__(self, copy_features: bool = False):
        super().__init__()
        self.audio, self.video = nn.Linear(10, 16), nn.Linear(12, 16)
        self.fc = nn.Linear(32, 4)
        self.copy_features = copy_features

    def forward(self, a, v):
        h = [torch.relu(self.audio(a)), torch.relu(self.video(v))]
        pred = self.fc(torch.cat(h, dim=1))
        if self.copy_features:  # returns tensors the prediction was not computed from
            h = [x.detach().clone().requires_grad_() for x in h]
        return pred, h

    @property
    def head_layer(self):  # what CGGM compares with its classifiers (or pass CGGM(head_layer=...))
        return self.fc


def data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g), torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


def bound(model, method, optimizer):
    return method.bind(model, TASK, ["audio", "video"], optimizer=optimizer,
                       modality_parameters=[model.audio.parameters(), model.video.parameters()])


# -- item 1: the paper rule is Eq. 8 on gradients, before clipping ---------------------------------
class Huge(PaperRule):
    """An unbounded rule at its worst: B = 2e7 (measured for the raw Eq. 7 when improvements cancel)."""

    def propose(self, eps):
        return torch.full_like(eps.float(), 2e7), {"previous": eps}


def test_unbounded_B_acts_on_gradients_before_clipping_so_a_step_stays_small():
    torch.manual_seed(0)
    model = TwoModal()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    method = bound(model, CGGM(rule=Huge(1.3), lam=0.0, direction="off"), opt)
    assert method.where_B_acts() == "gradient"  # auto, unbounded rule: never on updates
    for step in range(3):
        a, v, y = data(seed=step)
        before = [p.detach().clone() for p in model.parameters()]
        pred, feats = model(a, v)
        loss = method.loss(ModelOutput(pred, feats), y, TASK.loss(pred, y))
        opt.zero_grad()
        method.backward(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.8)
        method.step(opt)
        moved = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))
        assert moved < 0.01, moved  # Adam moves a weight by ~lr; B x lr would be 2e4


def test_unbounded_rule_on_updates_is_refused_and_cggm_paper_scales_gradients():
    with pytest.raises(ValueError, match="unbounded B"):
        CGGM(rule="paper", scale_on="update")
    with pytest.raises(ValueError, match="unbounded B"):
        build_method("cggm_paper", scale_on="update")
    model = build_model("mlp", {"a": (5,), "b": (6,)}, TASK)
    method = build_method("cggm_paper").bind(model, TASK, optimizer=torch.optim.Adam(model.parameters()))
    assert method.where_B_acts() == "gradient"
    official = build_method("cggm_official").bind(model, TASK, optimizer=torch.optim.Adam(model.parameters()))
    assert (official.where_B_acts(), official.direction, official.rule.name) == ("gradient", "weight", "paper")


# -- item 2: the official variant feeds Eq. 7 the official signal on regression ---------------------
def test_official_variant_uses_batch_sign_accuracy_on_regression_and_blows_up_as_published():
    g = torch.Generator().manual_seed(0)
    task = Task("regression", 1)
    model = build_model("mlp", {"a": (4,), "b": (3,)}, task)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    method = build_method("cggm_official").bind(model, task, optimizer=opt)
    n, Bs = 16, []
    for _ in range(60):
        x = {"a": torch.randn(n, 4, generator=g), "b": torch.randn(n, 3, generator=g)}
        y = (x["a"][:, 0] + 0.3 * x["b"][:, 0]).clamp(-3, 3)
        out = model(x)
        loss = method.loss(out, y, task.loss(out.prediction, y))
        opt.zero_grad()
        method.backward(loss)
        method.step(opt)
        rec = method.records()
        for m in ("a", "b"):
            e = float(rec[f"eps/{m}"])
            assert 0 <= e <= 1 and abs(e * n - round(e * n)) < 1e-6  # a batch accuracy: k / n
        Bs.append(torch.stack([rec["B/a"], rec["B/b"]]))
    Bs = torch.stack(Bs)
    # the published behaviour: sums of improvements cancel exactly -> |B| ~ 1e5+, and sign flips
    assert float(Bs.abs().max()) > 1e4
    assert bool((Bs < 0).any())
    # the default metric on regression stays -MAE (continuous)
    assert build_method("cggm").metric == "task"


# -- item 3: a loop that bypasses the method is noticed -------------------------------------------
def _plain_loop(backward_and_step):
    torch.manual_seed(0)
    model = TwoModal()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    method = bound(model, CGGM(), opt)
    for i in range(2):
        a, v, y = data(seed=i)
        pred, feats = model(a, v)
        loss = method.loss(ModelOutput(pred, feats), y, TASK.loss(pred, y))
        opt.zero_grad()
        backward_and_step(loss, opt)


def test_plain_optimizer_step_is_refused_with_the_fix():
    with pytest.raises(ProtocolError, match=r"method\.step\(optimizer\)"):
        _plain_loop(lambda loss, opt: (loss.backward(), opt.step()))


def test_grad_scaler_stepping_the_optimizer_directly_is_refused():
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ProtocolError, match="scaler=scaler"):
        _plain_loop(lambda loss, opt: (scaler.scale(loss).backward(), scaler.step(opt), scaler.update()))


def test_grad_scaler_through_the_method_applies_update_scaling():
    """fp16-style loop on CPU: the scaled loss, method.step(opt, scaler=scaler); each encoder's
    update is B times a twin's plain update (B = rho (M-1)/M at the first step, by the rule's
    definition), and a step the scaler skips (inf) commits nothing."""
    torch.manual_seed(0)
    model = TwoModal()
    twin = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt_twin = torch.optim.Adam(twin.parameters(), lr=1e-2)
    method = bound(model, CGGM(lam=0.0, direction="off", rho=1.3), opt)
    assert method.where_B_acts() == "update"
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    a, v, y = data()
    before = [p.detach().clone() for p in model.parameters()]
    pred, feats = model(a, v)
    loss = method.loss(ModelOutput(pred, feats), y, TASK.loss(pred, y))
    opt.zero_grad()
    method.backward(scaler.scale(loss))
    assert method.step(opt, scaler=scaler)
    scaler.update()
    pt, _ = twin(a, v)
    opt_twin.zero_grad()
    TASK.loss(pt, y).backward()
    opt_twin.step()
    assert opt.state[model.audio.weight]["step"] == 1  # the step was taken
    for (name, p), q, b in zip(model.named_parameters(), twin.parameters(), before):
        factor = 0.65 if name.split(".")[0] in ("audio", "video") else 1.0
        torch.testing.assert_close(p.detach() - b, factor * (q.detach() - b), rtol=1e-4, atol=1e-7, msg=name)
    # a step with inf gradients: the scaler skips it, the classifiers and the rule do not move
    state = copy.deepcopy(method.state_dict())
    pred, feats = model(a, v)
    loss = method.loss(ModelOutput(pred, feats), y, TASK.loss(pred, y))
    opt.zero_grad()
    method.backward(scaler.scale(loss) * float("inf"))
    assert method.step(opt, scaler=scaler) is False
    assert_same_state(method.state_dict(), state)


def test_protocol_errors_name_the_fix():
    model = TwoModal()
    method = CGGM(head_layer=model.fc)
    a, v, y = data()
    pred, feats = model(a, v)
    with pytest.raises(ProtocolError, match="before bind"):
        method.loss(ModelOutput(pred, feats), y, TASK.loss(pred, y))
    with pytest.raises(ValueError, match="does not declare its modalities"):
        method.bind(model, TASK)
    with pytest.raises(ValueError, match="Duplicate modality names"):
        method.bind(model, TASK, ["audio", "audio"])
    method.bind(model, TASK, ["audio", "video"], optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="ModelOutput"):
        method.loss((pred, feats), y, TASK.loss(pred, y))
    with pytest.raises(ProtocolError, match="without"):
        method.step(torch.optim.SGD(model.parameters(), lr=0.1))
    unbound_auto = CGGM(head_layer=model.fc).bind(model, TASK, ["audio", "video"])
    with pytest.raises(ProtocolError, match="optimizer=optimizer"):
        unbound_auto.loss(ModelOutput(pred, feats), y, TASK.loss(pred, y))


def test_gradient_editing_method_needs_method_backward():
    d = load_dataset("synthetic", n_train=32, n_val=8, n_test=8)
    model = build_model("mlp", d.input_shapes, d.task)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = build_method("ogm_ge").bind(model, d.task, d.modalities, optimizer=opt)
    inputs, masks, y = d.train.get_batch(torch.arange(16))
    out = model(inputs, masks)
    loss = method.loss(out, y, d.task.loss(out.prediction, y))
    loss.backward()
    with pytest.raises(ProtocolError, match=r"method\.backward\(loss\)"):
        method.step(opt)


# -- item 4: a skipped step leaves every method's state untouched ---------------------------------
def _snapshot(method):
    mods = {n: copy.deepcopy(m.state_dict()) for n, m in method.modules().items()}
    return {"state": copy.deepcopy(method.state_dict()), "modules": mods}


@pytest.mark.parametrize("name", list_methods())
def test_a_skipped_nan_step_leaves_the_method_untouched(name):
    d = load_dataset("synthetic", n_train=64, n_val=8, n_test=8)
    torch.manual_seed(0)
    model = build_model("mlp", d.input_shapes, d.task, feature_dim=8, hidden=16, head_hidden=16)
    method = build_method(name)
    method.bind(model, d.task, d.modalities)
    opt = torch.optim.Adam([g for g in method.param_groups(model)][0]["params"], lr=1e-2) \
        if len(method.param_groups(model)) == 1 else torch.optim.Adam(method.param_groups(model), lr=1e-2)
    method.set_optimizer(opt)
    batches = [d.train.get_batch(torch.arange(s, s + 16)) for s in range(0, 64, 16)]
    method.begin_epoch(EpochContext.from_loaders(model, d.task, 0, 1, train=batches, val=batches))

    def attempt(inputs, masks, y):
        inputs, masks = method.prepare(inputs, masks)
        out = model(inputs, masks)
        loss = method.loss(out, y, d.task.loss(out.prediction, y))
        opt.zero_grad(set_to_none=True)
        method.backward(loss)
        return loss

    for i in range(2):
        attempt(*d.train.get_batch(torch.arange(16 * i, 16 * i + 16)))
        method.step(opt)
    before = _snapshot(method)
    inputs, masks, y = d.train.get_batch(torch.arange(32, 48))
    bad = {k: torch.full_like(v, float("nan")) for k, v in inputs.items()}
    loss = attempt(bad, masks, y)
    assert not torch.isfinite(loss)
    method.skip()
    after = _snapshot(method)
    assert_same_state(after, before, name)
    # and the next good step is finite everywhere
    loss = attempt(inputs, masks, y)
    method.step(opt)
    assert torch.isfinite(loss)
    for k, v in method.records().items():
        assert torch.isfinite(v).all(), (name, k)
    for m in method.modules().values():
        for p in m.parameters():
            assert torch.isfinite(p).all(), name


def test_engine_skips_one_bad_batch_per_epoch_and_keeps_learning():
    """One training sample is NaN: its batch is skipped each epoch; CGGM's classifiers and rule
    stay finite, so every other step trains (before: 20 of 24 steps skipped, chance accuracy)."""
    config = TrainConfig(epochs=4, batch_size=32, progress=False, on_nonfinite="skip")
    clean = load_dataset("synthetic", n_train=256, n_val=128, n_test=256, seed=1)
    torch.manual_seed(0)
    ref = Trainer(build_model("mlp", clean.input_shapes, clean.task), build_method("cggm"), clean, config).fit()
    d = load_dataset("synthetic", n_train=256, n_val=128, n_test=256, seed=1)
    d.train.inputs[d.modalities[0]][5] = float("nan")
    torch.manual_seed(0)
    method = build_method("cggm")
    result = Trainer(build_model("mlp", d.input_shapes, d.task), method, d, config).fit()
    assert result.skipped_steps == 4
    assert method.global_step == 4 * 8 - 4
    assert all(torch.isfinite(torch.tensor(v)).all() for v in result.records.values())
    # one batch in eight missing changes little: far from chance (0.25), near the clean run
    assert result.test["accuracy"] > ref.test["accuracy"] - 0.1 and result.test["accuracy"] > 0.4


# -- item 5: modulation through features the prediction was not computed from ---------------------
@pytest.mark.parametrize("name", ["cggm", "agm"])
def test_feature_hooks_that_never_fire_are_an_error(name):
    torch.manual_seed(0)
    model = TwoModal(copy_features=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {"scale_on": "gradient", "head_layer": model.fc} if name == "cggm" else {}
    method = build_method(name, **options)
    if name == "agm":
        model.predict = lambda feats, masks=None: model.fc(torch.cat(feats, 1))
    method.bind(model, TASK, ["audio", "video"], optimizer=opt)
    a, v, y = data()
    pred, feats = model(a, v)
    loss = method.loss(ModelOutput(pred, feats), y, TASK.loss(pred, y))
    opt.zero_grad()
    method.backward(loss)
    with pytest.raises(ProtocolError, match="no gradient flowed"):
        method.step(opt)


# -- item 6: under SGD, B scales the gradient only (not momentum, not weight decay) ---------------
def test_auto_scaling_under_sgd_is_eq8_with_momentum_and_weight_decay():
    torch.manual_seed(0)
    model = TwoModal()
    twin = copy.deepcopy(model)
    kw = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.5}
    opt, opt_twin = torch.optim.SGD(model.parameters(), **kw), torch.optim.SGD(twin.parameters(), **kw)
    method = bound(model, CGGM(lam=0.0, direction="off", rho=1.3), opt)
    assert method.where_B_acts() == "gradient"
    for step in range(3):
        a, v, y = data(seed=step)
        pred, feats = model(a, v)
        loss = method.loss(ModelOutput(pred, feats), y, TASK.loss(pred, y))
        opt.zero_grad()
        method.backward(loss)
        B = {"audio": method.records()["B/audio"], "video": method.records()["B/video"]}
        method.step(opt)
        # reference: plain SGD on the twin with the encoders' task gradient times B (Eq. 8)
        pt, _ = twin(a, v)
        opt_twin.zero_grad()
        TASK.loss(pt, y).backward()
        with torch.no_grad():
            for m in ("audio", "video"):
                for p in getattr(twin, m).parameters():
                    p.grad.mul_(B[m])
        opt_twin.step()
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"step {step} {name}")


def test_update_scaling_with_sgd_momentum_warns():
    model = TwoModal()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match="momentum buffer and weight decay"):
        bound(model, CGGM(scale_on="update"), opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bound(TwoModal(), CGGM(scale_on="update"), torch.optim.Adam(TwoModal().parameters()))


# -- item 7: parameters shared between modalities -------------------------------------------------
def test_overlapping_modality_parameters_are_refused_where_factors_would_multiply():
    model = TwoModal()
    shared = [list(model.audio.parameters()), list(model.video.parameters()) + [model.audio.weight]]
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="declared for both 'audio' and 'video'"):
        CGGM(scale_on="update").bind(model, TASK, ["audio", "video"], modality_parameters=shared, optimizer=opt)
    with pytest.raises(ValueError, match="declared for both"):
        build_method("ogm_ge").bind(model, TASK, ["audio", "video"], modality_parameters=shared)


def test_a_shared_layer_under_gradient_scaling_gets_each_paths_gradient_times_its_B():
    """Defined rule: with B on gradients, a layer used by both modalities' paths (before the
    features) gets B_audio g_audio + B_video g_video, g_m its gradient through modality m's path."""

    class Shared(TwoModal):
        def __init__(self):
            super().__init__()
            self.pre = nn.Linear(10, 10)
            self.video = nn.Linear(10, 16)

        def forward(self, a, v):
            h = [torch.relu(self.audio(self.pre(a))), torch.relu(self.video(self.pre(v)))]
            return self.fc(torch.cat(h, 1)), h

    torch.manual_seed(0)
    model = Shared()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = CGGM(head_layer=model.fc, lam=0.0, direction="off").bind(model, TASK, ["audio", "video"], optimizer=opt)
    a, y = torch.randn(8, 10), torch.randint(0, 4, (8,))
    v = torch.randn(8, 10)
    twin = copy.deepcopy(model)
    pred, feats = model(a, v)
    loss = method.loss(ModelOutput(pred, feats), y, TASK.loss(pred, y))
    opt.zero_grad()
    method.backward(loss)
    B = [method.records()["B/audio"], method.records()["B/video"]]
    pt, ht = twin(a, v)
    grads_h = torch.autograd.grad(TASK.loss(pt, y), ht, retain_graph=True)
    paths = [torch.autograd.grad(h, twin.pre.weight, grad_outputs=g, retain_graph=True)[0] for h, g in zip(ht, grads_h)]
    torch.testing.assert_close(model.pre.weight.grad, B[0] * paths[0] + B[1] * paths[1], rtol=1e-5, atol=1e-7)


# -- gradient accumulation: the rule and the classifiers advance once per optimizer step ----------
def test_gradient_accumulation_commits_once_per_optimizer_step():
    torch.manual_seed(0)
    model = TwoModal()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    method = bound(model, CGGM(), opt)
    for k in range(3):  # three micro-batches, one step
        a, v, y = data(n=8, seed=k)
        pred, feats = model(a, v)
        loss = method.loss(ModelOutput(pred, feats), y, TASK.loss(pred, y)) / 3
        method.backward(loss)
    assert method.rule.steps == 0 and method.global_step == 0
    method.step(opt)
    assert method.rule.steps == 1 and method.global_step == 1
    assert opt.state[model.fc.weight]["step"] == 1


def test_unsupported_settings_stay_unsupported():
    with pytest.raises(UnsupportedSettingError):
        build_method("agm").bind(TwoModal(), Task("regression", 1), ["audio", "video"])


# -- item 9: OGM-GE's noise does not depend on (or consume) the process's global RNG --------------
def test_ogm_ge_noise_comes_from_its_own_generator():
    d = load_dataset("synthetic", n_train=32, n_val=8, n_test=8)
    inputs, masks, y = d.train.get_batch(torch.arange(16))

    def noisy_grads(global_seed):
        torch.manual_seed(0)
        model = build_model("mlp", d.input_shapes, d.task, feature_dim=8, hidden=16, head_hidden=16)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        method = build_method("ogm_ge", seed=7).bind(model, d.task, d.modalities, optimizer=opt)
        out = model(inputs, masks)
        loss = method.loss(out, y, d.task.loss(out.prediction, y))
        torch.manual_seed(global_seed)  # each rank's global stream may differ (dropout, data order)
        state = torch.get_rng_state()
        method.backward(loss)
        assert torch.equal(torch.get_rng_state(), state)  # the global stream was not consumed
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(noisy_grads(1), noisy_grads(2)):
        assert torch.equal(a, b)  # same noise whatever the global RNG: replicas stay identical
