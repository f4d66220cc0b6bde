"""MSES (our specification, methods-balancemm.md section 11): a scripted validation-loss sequence
stops exactly the expected modality at the expected epoch; the loss and the validation losses
recomputed by hand; a stopped modality's encoder and head no longer move."""

from __future__ import annotations

import math

import torch
from helpers import batch, context, make_optimizer, tiny_data, tiny_model, train_step

from cggm.methods import build_method


def _hand_ce(h, W, b, y):
    total = 0.0
    for i in range(len(y)):
        z = [sum(h[i][k] * W[c][k] for k in range(len(h[i]))) + b[c] for c in range(len(W))]
        total += math.log(sum(math.exp(v) for v in z)) - z[y[i]]
    return total / len(y)


def _setup(**kw):
    data = tiny_data(2)
    model = tiny_model(data)
    method = build_method("mses", **kw).bind(model, data.task, data.modalities)
    opt = make_optimizer(model, method, kind="adam")
    method.begin_epoch(context(data, model, 0))
    return data, model, method, opt


def _snapshot(model, method):
    enc = {m: [p.detach().clone() for p in ps] for m, ps in model.modality_parameters().items()}
    heads = [[p.detach().clone() for p in h.parameters()] for h in method.heads.modules]
    return enc, heads


def test_scripted_validation_losses_stop_the_expected_modality_at_the_expected_epoch():
    data, model, method, opt = _setup(patience=2, min_delta=0.01)
    train_step(model, method, opt, *batch(data))
    # modality 0 improves at epoch 1, then not by more than min_delta: stopped after epoch 3;
    # modality 1 keeps improving
    script = iter([[1.0, 1.0], [0.9, 0.8], [0.895, 0.7], [0.95, 0.6], [0.5, 0.5]])
    method.validation_losses = lambda ctx: next(script)
    stopped_at = []
    for epoch in range(4):
        ctx = context(data, model, epoch)
        method.begin_epoch(ctx)
        train_step(model, method, opt, *batch(data))
        method.finish_epoch(ctx)
        stopped_at.append(list(method.stopped_at))
    assert stopped_at == [[-1, -1], [-1, -1], [-1, -1], [3, -1]]
    assert method.best == [0.9, 0.6] and method.bad_epochs == [2, 0]
    # after the stop: encoder 0 and head 0 do not move (Adam's momentum included), modality 1's do
    enc, heads = _snapshot(model, method)
    method.begin_epoch(context(data, model, 4))
    train_step(model, method, opt, *batch(data, start=32))
    m0, m1 = data.modalities
    for a, p in zip(enc[m0], model.modality_parameters()[m0]):
        assert torch.equal(a, p.detach()) and not p.requires_grad
    for a, p in zip(heads[0], method.heads.modules[0].parameters()):
        assert torch.equal(a, p.detach())
    assert any(not torch.equal(a, p.detach()) for a, p in zip(enc[m1], model.modality_parameters()[m1]))
    method.finish_epoch(context(data, model, 4))  # a stopped modality stays stopped
    assert method.stopped_at == [3, -1]


def test_loss_equals_task_plus_live_unimodal_losses():
    data, model, method, opt = _setup(patience=1)
    inputs, masks, target = batch(data, size=6)
    out = model(inputs, masks)
    task_loss = data.task.loss(out.prediction, target)
    loss = method.loss(out, target, task_loss)
    y = target.tolist()
    hand = [_hand_ce(h.detach().tolist(), head.layer.weight.detach().tolist(), head.layer.bias.detach().tolist(), y)
            for h, head in zip(out.features, method.heads.modules)]
    torch.testing.assert_close(loss.detach(), task_loss.detach() + sum(hand), rtol=1e-5, atol=1e-5)
    method.skip()
    method.stopped_at = [-1, 0]  # modality 1 stopped: its head's loss leaves the sum
    out = model(inputs, masks)
    torch.testing.assert_close(method.loss(out, target, data.task.loss(out.prediction, target)).detach(),
                               task_loss.detach() + hand[0], rtol=1e-5, atol=1e-5)


def test_validation_losses_are_the_heads_mean_losses_over_val():
    data, model, method, opt = _setup()
    train_step(model, method, opt, *batch(data))
    ctx = context(data, model, 0, batch_size=10)  # uneven batches: a mean over samples, not batches
    got = method.validation_losses(ctx)
    inputs, masks, target = data.val.get_batch(torch.arange(len(data.val)))
    model.eval()
    with torch.no_grad():
        out = model(inputs, masks)
    model.train()
    y = target.tolist()
    for i, head in enumerate(method.heads.modules):
        hand = _hand_ce(out.features[i].tolist(), head.layer.weight.detach().tolist(), head.layer.bias.detach().tolist(), y)
        assert abs(got[i] - hand) < 1e-5
    assert model.training and method.heads.modules.training


def test_restore_best_sets_back_the_best_weights():
    data, model, method, opt = _setup(patience=1, restore_best=True)
    train_step(model, method, opt, *batch(data))
    script = iter([[1.0, 1.0], [2.0, 0.5]])
    method.validation_losses = lambda ctx: next(script)
    method.finish_epoch(context(data, model, 0))
    best_enc, best_heads = _snapshot(model, method)
    method.begin_epoch(context(data, model, 1))
    train_step(model, method, opt, *batch(data, start=32))
    method.finish_epoch(context(data, model, 1))
    assert method.stopped_at == [1, -1]
    m0 = data.modalities[0]
    for a, p in zip(best_enc[m0], model.modality_parameters()[m0]):
        assert torch.equal(a, p.detach())
    for a, p in zip(best_heads[0], method.heads.modules[0].parameters()):
        assert torch.equal(a, p.detach())


def test_changes_training_vs_joint():
    data = tiny_data(2)
    results = []
    for name in ("joint", "mses"):
        model = tiny_model(data)
        method = build_method(name).bind(model, data.task, data.modalities)
        opt = make_optimizer(model, method, kind="sgd")
        method.begin_epoch(context(data, model, 0))
        train_step(model, method, opt, *batch(data))
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(results[0], results[1])
