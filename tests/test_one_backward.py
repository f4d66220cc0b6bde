"""CGGM's classifiers learn from the model's backward pass (a second root of it, issue 11), and
that must give what separate passes give: under gradient accumulation, under a GradScaler, after a
skipped step. References are copies of the classifiers trained by a plain torch optimizer on the
classifiers' own losses, from features captured outside the method."""

from __future__ import annotations

import copy

import pytest
import torch
from _twomodal import TASK, TwoModal
from torch import nn

from cggm import CGGM, ModelOutput, ProtocolError, Task


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g), torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


def setup(**kw):
    torch.manual_seed(0)
    model = TwoModal()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # B on updates: with B on gradients, gradient accumulation is refused (test_accumulation.py)
    kw.setdefault("scale_on", "update")
    method = CGGM(head_layer=model.fc, classifier_optimizer="sgd", classifier_lr=0.1, **kw)
    method.bind(model, TASK, ["audio", "video"], optimizer=opt,
                modality_parameters=[model.audio.parameters(), model.video.parameters()])
    # one step builds the classifiers and gives their optimizer a momentum buffer
    step(model, method, opt, [data(16, 99)])
    return model, method, opt


def step(model, method, opt, batches, scaler=None):
    """One optimizer step over micro-batches; returns each micro-batch's detached features."""
    feats_seen = []
    opt.zero_grad()
    for a, v, y in batches:
        pred, feats = model(a, v)
        feats_seen.append(([f.detach().clone() for f in feats], y))
        loss = method.loss(ModelOutput(pred, feats), y, TASK.loss(pred, y)) / len(batches)
        method.backward(loss if scaler is None else scaler.scale(loss))
    method.step(opt, scaler=scaler)
    return feats_seen


def reference(method):
    """A copy of the classifiers and of their optimizer (plain, not fused)."""
    clfs = copy.deepcopy(method.classifiers)
    ref_opt = torch.optim.SGD(clfs.parameters(), lr=0.1, momentum=0.9, foreach=False)
    ref_opt.load_state_dict(copy.deepcopy(method.classifier_opt.state_dict()))
    return clfs, ref_opt


def reference_step(clfs, ref_opt, seen):
    """The classifiers' step on the micro-batches' mean loss: sum_i CE(f_i(h_i), y), each
    classifier on its own modality's captured features."""
    ref_opt.zero_grad()
    total = sum(TASK.loss(clf(h), y) for feats, y in seen for clf, h in zip(clfs, feats)) / len(seen)
    total.backward()
    ref_opt.step()


def assert_same_classifiers(method, clfs):
    for (name, p), q in zip(method.classifiers.named_parameters(), clfs.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("direction", ["off", "gradient"])
def test_classifiers_step_on_the_micro_batches_mean_gradient(direction):
    model, method, opt = setup(direction=direction)
    clfs, ref_opt = reference(method)
    seen = step(model, method, opt, [data(8, k) for k in range(3)])
    reference_step(clfs, ref_opt, seen)
    assert_same_classifiers(method, clfs)
    assert all(p.grad is None for p in method.classifiers.parameters())


def test_classifier_gradients_are_not_scaled_by_the_grad_scaler():
    model, method, opt = setup(direction="off")
    clfs, ref_opt = reference(method)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    seen = step(model, method, opt, [data(16, 1)], scaler=scaler)
    scaler.update()
    reference_step(clfs, ref_opt, seen)
    assert_same_classifiers(method, clfs)


def test_a_skipped_step_leaves_no_classifier_gradient_behind():
    """Back-propagated, then skipped (e.g. the caller's gradient check failed): the next step's
    classifier update comes from the next batch only."""
    model, method, opt = setup(direction="off")
    a, v, y = data(16, 5)
    pred, feats = model(a, v)
    method.backward(method.loss(ModelOutput(pred, feats), y, TASK.loss(pred, y)))
    method.skip()
    assert all(p.grad is None for p in method.classifiers.parameters())
    clfs, ref_opt = reference(method)
    seen = step(model, method, opt, [data(16, 6)])
    reference_step(clfs, ref_opt, seen)
    assert_same_classifiers(method, clfs)


def test_plain_loss_backward_is_refused_since_the_classifiers_would_not_learn():
    model, method, opt = setup(direction="off")
    a, v, y = data(16, 7)
    pred, feats = model(a, v)
    loss = method.loss(ModelOutput(pred, feats), y, TASK.loss(pred, y))
    loss.backward()
    with pytest.raises(ProtocolError, match=r"method\.backward\(loss\)"):
        method.step(opt)


def test_method_backward_inside_an_enclosing_autocast_equals_outside():
    """Lightning keeps autocast on around the whole training step; on CPU the backward pass runs
    on the calling thread, so without care the fp32 classifiers' backward ops would be cast to
    half precision there (measured: gradients off by 7e-6)."""
    model, method, opt = setup(direction="off")
    a, v, y = data(16, 8)
    grads = []
    for inside in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred, feats = model(a, v)
            loss = method.loss(ModelOutput(pred, feats), y, TASK.loss(pred, y))
            opt.zero_grad()
            if inside:
                method.backward(loss)
        if not inside:
            method.backward(loss)
        grads.append([p.grad.clone() for p in [*model.parameters(), *method.classifiers.parameters()]])
        method.skip()
    for g_out, g_in in zip(*grads):
        torch.testing.assert_close(g_in, g_out, rtol=0, atol=0)


def test_direction_term_names_a_head_layer_the_loss_does_not_use():
    torch.manual_seed(0)
    model = TwoModal()
    unused = nn.Linear(32, 4)  # the same shape as model.fc, but not on the prediction's path
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    method = CGGM(head_layer=unused).bind(model, TASK, ["audio", "video"], optimizer=opt)
    a, v, y = data(16, 9)
    pred, feats = model(a, v)
    with pytest.raises(ValueError, match="does not depend on it"):
        method.loss(ModelOutput(pred, feats), y, TASK.loss(pred, y))


class Frozen(nn.Module):
    """A user classifier (``last`` shaped like the head's last layer) with no trainable parameter."""

    def __init__(self):
        super().__init__()
        self.body, self.last = nn.Linear(16, 32), nn.Linear(32, 4)
        self.requires_grad_(False)

    def forward(self, h, mask=None, size=None):
        return self.last(torch.relu(self.body(h)))


def test_frozen_user_classifiers_are_measured_but_not_trained():
    torch.manual_seed(0)
    model = TwoModal()
    clfs = [Frozen() for _ in range(2)]
    before = [copy.deepcopy(c.state_dict()) for c in clfs]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    method = CGGM(head_layer=model.fc, classifiers=clfs, direction="off").bind(
        model, TASK, ["audio", "video"], optimizer=opt,
        modality_parameters=[model.audio.parameters(), model.video.parameters()])
    step(model, method, opt, [data(16, 10)])
    assert method.global_step == 1
    for c, b in zip(clfs, before):
        for k, v in c.state_dict().items():
            assert torch.equal(v, b[k])


def test_batched_classifier_metric_equals_one_call_per_prediction():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (32,), generator=g)
    preds = [torch.randn(32, 4, generator=g) for _ in range(3)]
    preds[1][:, 0] += 5.0  # a classifier that mostly says class 0: different accuracies
    one_by_one = torch.stack([TASK.batch_metric(p, y) for p in preds])
    assert len(set(one_by_one.tolist())) > 1
    torch.testing.assert_close(TASK.batch_metrics(preds, y), one_by_one, rtol=0, atol=0)
    seg = Task("segmentation", 3)  # other tasks: one call per prediction
    maps = [torch.randn(2, 3, 4, 4, generator=g) for _ in range(2)]
    target = torch.randint(0, 3, (2, 4, 4), generator=g)
    torch.testing.assert_close(seg.batch_metrics(maps, target),
                               torch.stack([seg.batch_metric(m, target) for m in maps]), rtol=0, atol=0)
