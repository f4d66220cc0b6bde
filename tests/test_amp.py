"""AMP with the method protocol, on CPU: bf16 autocast, and fp16 autocast with a GradScaler (CPU fp16
autocast runs the ops these models use in torch 2.13): training moves the weights and stays
finite, the method's own modules keep fp32 weights, and a step the scaler skips commits nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from _state import assert_same_state

from cggm.data import BatchIterator, load_dataset
from cggm.methods import build_method
from cggm.models import build_model


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", dim=8, n_train=64, n_val=16, n_test=16)


def _setup(data, name="cggm"):
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shapes, data.task, feature_dim=8, hidden=16, head_hidden=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, optimizer, build_method(name).bind(model, data.task, optimizer=optimizer)


def _step(model, optimizer, method, batch, task, dtype, scaler=None):
    inputs, masks, target = batch
    with torch.autocast("cpu", dtype=dtype):
        out = model(inputs, masks)
        loss = method.loss(out, target, task.loss(out.prediction, target))
    optimizer.zero_grad(set_to_none=True)
    method.backward(loss if scaler is None else scaler.scale(loss))
    taken = method.step(optimizer, scaler=scaler)
    if scaler is not None:
        scaler.update()
    return out, loss, taken


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cggm_trains_under_autocast(data, dtype):
    model, optimizer, method = _setup(data)
    scaler = torch.amp.GradScaler("cpu") if dtype == torch.float16 else None
    before = copy.deepcopy(model.state_dict())
    Bs = []
    for epoch in range(2):
        for batch in BatchIterator(data.train, 16, True, epoch=epoch):
            out, loss, taken = _step(model, optimizer, method, batch, data.task, dtype, scaler)
            assert taken and torch.isfinite(loss)
            Bs.append(float(method.records()["B/strong"]))
    # autocast ran the model in low precision; every weight (model and classifiers) stays fp32
    assert out.prediction.dtype == dtype and out.features[0].dtype == dtype
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.dtype for p in method.classifiers.parameters()} == {torch.float32}
    assert {v.dtype for v in method.classifier_opt.state_dict()["state"][0].values() if v.ndim} == {torch.float32}
    assert method.global_step == 8
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items()), "a weight did not move"
    assert len(set(Bs)) > 1 and all(torch.isfinite(torch.tensor(Bs)))  # B moves with the classifiers' metrics
    assert "L_gm" in method.records() and torch.isfinite(method.records()["L_gm"])


@pytest.mark.parametrize("name", ["cggm", "ume", "ogm_ge"])  # classifiers / heads with own optimizers / gradient edits
def test_a_step_the_scaler_skips_commits_nothing(data, name):
    model, optimizer, method = _setup(data, name)
    batches = list(BatchIterator(data.train, 16, True))
    _step(model, optimizer, method, batches[0], data.task, torch.float16, torch.amp.GradScaler("cpu"))  # builds heads
    state = copy.deepcopy(method.state_dict())
    weights = copy.deepcopy(model.state_dict())
    # a scale so large that the fp16 backward overflows: the scaler skips the step
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60, backoff_factor=2.0**-50)
    _, loss, taken = _step(model, optimizer, method, batches[1], data.task, torch.float16, scaler)
    assert torch.isfinite(loss) and not taken and scaler.get_scale() == 2.0**10
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert_same_state(method.state_dict(), state)
    _, _, taken = _step(model, optimizer, method, batches[1], data.task, torch.float16, scaler)
    assert taken and method.global_step == 2
