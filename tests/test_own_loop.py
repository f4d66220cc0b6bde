"""Issue 17 item 2: the README's own loop ("CGGM in your own training loop": prepare, loss, backward,
step; the optimizer built from model.parameters(); no epoch hooks) with every registered method
either changes training (final weights differ from joint training's, same seed and batches) or
raises cggm.ProtocolError naming the fix; it never silently trains as joint training. The loop
written the documented way (epoch hooks, the method's parameter groups) runs for every method."""

from __future__ import annotations

import pytest
import torch

import cggm
from cggm.data import BatchIterator, load_dataset
from cggm.methods import EpochContext, build_method, list_methods
from cggm.models import build_model
from cggm.optim import build_optimizer
from cggm.training.evaluation import evaluate

EPOCHS = 3
FIXES = ("method.begin_epoch", "method.param_groups")  # what each refusal must name


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", dim=8, n_train=48, n_val=16, n_test=16)


def _model(data):
    torch.manual_seed(0)
    return build_model("mlp", data.input_shapes, data.task, feature_dim=8, hidden=16, head_hidden=16)


def _batches(data, epoch):
    return BatchIterator(data.train, 16, shuffle=True, seed=0, epoch=epoch)


def _step(method, model, optimizer, batch, task):
    inputs, masks, target = batch
    inputs, masks = method.prepare(inputs, masks)
    out = model(inputs, masks)
    loss = method.loss(out, target, task.loss(out.prediction, target))
    optimizer.zero_grad()
    method.backward(loss)
    method.step(optimizer)


def _readme_loop(data, name):
    """The README's own loop: no epoch hooks, the optimizer over model.parameters()."""
    model = _model(data)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    method = build_method(name).bind(model, data.task, optimizer=optimizer)
    for epoch in range(EPOCHS):
        for batch in _batches(data, epoch):
            _step(method, model, optimizer, batch, data.task)
    return model


def _documented_loop(data, name):
    """The loop the README documents for every method: epoch hooks, the method's parameter groups."""
    model = _model(data)
    method = build_method(name)
    optimizer = build_optimizer("adam", method.bind(model, data.task).param_groups(model), 1e-2)
    method.set_optimizer(optimizer)
    val = list(BatchIterator(data.val, 16, shuffle=False))
    metrics = {}
    for epoch in range(EPOCHS):
        train = list(_batches(data, epoch))
        method.begin_epoch(EpochContext.from_loaders(model, data.task, epoch, EPOCHS, train=train, val=val))
        for batch in train:
            _step(method, model, optimizer, batch, data.task)
        metrics = evaluate(model, method, data.val, data.task, "cpu", 16)
        method.finish_epoch(EpochContext.from_loaders(model, data.task, epoch, EPOCHS, metrics, train=train, val=val))
    return model, method, metrics


@pytest.fixture(scope="module")
def joint_weights(data):
    return [p.detach().clone() for p in _readme_loop(data, "joint").parameters()]


OUTCOMES: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if OUTCOMES:  # pytest -s shows it
        counts = {k: sum(v == k for v in OUTCOMES.values()) for k in ("changed", "refused")}
        print(f"\nREADME own loop: {counts}", dict(sorted(OUTCOMES.items())))


@pytest.mark.parametrize("name", [n for n in list_methods() if n != "joint"])
def test_readme_loop_changes_training_or_refuses(data, joint_weights, name):
    support = build_method(name).support
    try:
        model = _readme_loop(data, name)
    except cggm.ProtocolError as err:
        assert any(fix in str(err) for fix in FIXES), str(err)
        assert support.epoch_hooks or support.param_groups  # refused for what it declared it needs
        OUTCOMES[name] = "refused"
        return
    assert not (support.epoch_hooks or support.param_groups)  # (this loop has neither)
    weights = list(model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(weights, joint_weights)), (
        f"{name} in the README's own loop ends with joint training's weights: it did nothing")
    OUTCOMES[name] = "changed"


@pytest.mark.parametrize("name", list_methods())
def test_documented_loop_runs_for_every_method(data, name):
    model, method, metrics = _documented_loop(data, name)
    assert method.global_step == EPOCHS * 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_an_epoch_window_makes_a_method_need_its_epoch_hooks():
    """A window (or an epoch-dependent schedule) set on a method that otherwise ignores epochs: the
    plain loop would never leave epoch 0, so the window would silently never open (or close)."""
    from cggm.methods import build_method

    for name, options in [("agm", {"start_epoch": 2}), ("ogm_ge", {"end_epoch": 3}), ("mbsd", {"start_epoch": 1}),
                          ("cml", {"variant": "bmm"})]:
        assert build_method(name, **options).support.epoch_hooks, name
        assert not build_method(name).support.epoch_hooks, name
