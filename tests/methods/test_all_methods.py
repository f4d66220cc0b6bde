"""Every registered method: two public training steps with M=2 and M=3, and an exact resume."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import batch, context, make_optimizer, tiny_data, tiny_model, train_step

from cggm.methods import UnsupportedSettingError, build_method, list_methods

METHODS = list_methods()


@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("name", METHODS)
def test_two_steps(name, M):
    data = tiny_data(M)
    model = tiny_model(data)
    method = build_method(name)
    if M > 2 and method.support.max_modalities is not None and method.support.max_modalities < M:
        with pytest.raises(UnsupportedSettingError):
            method.bind(model, data.task, data.modalities)
        return
    method.bind(model, data.task, data.modalities)
    opt = make_optimizer(model, method)
    method.begin_epoch(context(data, model, 0))
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(2):
        inputs, masks, target = batch(data, start=16 * step)
        loss = train_step(model, method, opt, inputs, masks, target)
        assert torch.isfinite(loss)
        for p in model.parameters():
            if p.grad is not None:
                assert torch.isfinite(p.grad).all(), name
    changed = [not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters())]
    assert any(changed), f"{name}: no parameter changed"
    for k, v in method.records().items():
        assert torch.isfinite(v).all(), (name, k)


def _epoch_hooks(method, data, model, epoch):
    method.begin_epoch(context(data, model, epoch))


@pytest.mark.parametrize("name", METHODS)
def test_state_roundtrip(name):
    """State after N steps (and an epoch boundary), loaded into a fresh method: the next step is
    identical to the uninterrupted run's."""
    data = tiny_data(2)
    model = tiny_model(data)
    method = build_method(name).bind(model, data.task, data.modalities)
    opt = make_optimizer(model, method)
    ctx = context(data, model, 0)
    method.begin_epoch(ctx)
    for step in range(2):
        train_step(model, method, opt, *batch(data, start=16 * step))
    method.finish_epoch(ctx)
    method.begin_epoch(context(data, model, 1))
    train_step(model, method, opt, *batch(data, start=8))

    saved = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
             "method": copy.deepcopy(method.state_dict()), "rng": torch.get_rng_state()}

    nxt = batch(data, start=24)
    train_step(model, method, opt, *nxt)
    expected = [p.detach().clone() for p in model.parameters()]

    model2 = tiny_model(data, seed=123)
    model2.load_state_dict(saved["model"])
    method2 = build_method(name).bind(model2, data.task, data.modalities)
    opt2 = make_optimizer(model2, method2)
    opt2.load_state_dict(saved["opt"])
    method2.load_state_dict(saved["method"])
    method2.epoch = 1
    torch.set_rng_state(saved["rng"])
    train_step(model2, method2, opt2, *nxt)
    for a, b in zip(expected, model2.parameters()):
        torch.testing.assert_close(b.detach(), a, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("name", METHODS)
def test_trainer_fit(name):
    """The engine runs every method end to end (epoch hooks, test-time fusion, records)."""
    from cggm.training.trainer import TrainConfig, Trainer

    data = tiny_data(2)
    model = tiny_model(data)
    result = Trainer(model, build_method(name), data, TrainConfig(epochs=2, batch_size=32, progress=False)).fit()
    assert len(result.history) == 2
    assert 0.0 <= result.test["accuracy"] <= 1.0
