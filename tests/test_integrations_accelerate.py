"""The README's HF Accelerate recipe on CPU: method.backward instead of accelerator.backward, and
the AcceleratedOptimizer's step through a step function; bf16 and gradient accumulation."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate", reason="the Accelerate recipe needs the 'accelerate' extra: "
                                         "pip install -e '.[accelerate]'")

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from cggm.data import load_dataset  # noqa: E402
from cggm.data.base import collate  # noqa: E402
from cggm.methods import build_method  # noqa: E402
from cggm.models import build_model  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", dim=8, n_train=64, n_val=16, n_test=16)


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    # Accelerate keeps its settings in process-wide singletons: each test sets its own
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _setup(data, name="cggm"):
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shapes, data.task, feature_dim=8, hidden=16, head_hidden=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, optimizer, build_method(name).bind(model, data.task, optimizer=optimizer)


def _loader(data, batch_size=16):
    return DataLoader(data.train, batch_size=batch_size, shuffle=False, collate_fn=collate)


def _train(model, optimizer, method, loader, data, step, epochs=2, accelerator=None):
    outs = []
    for _ in range(epochs):
        for inputs, masks, target in loader:
            out = model(inputs, masks)
            loss = method.loss(out, target, data.task.loss(out.prediction, target))
            optimizer.zero_grad()
            method.backward(loss)
            method.step(step)
            outs.append(out)
    return outs


def _step_function(optimizer):
    def take_step():
        optimizer.step()
        return not optimizer.step_was_skipped
    return take_step


def test_recipe_trains_like_the_plain_loop(data):
    model, optimizer, method = _setup(data)
    accelerator = Accelerator(cpu=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, _loader(data))
    _train(model, optimizer, method, loader, data, _step_function(optimizer))
    assert method.global_step == 8
    ref_model, ref_opt, ref_method = _setup(data)
    _train(ref_model, ref_opt, ref_method, _loader(data), data, ref_opt)
    for a, b in zip(accelerator.unwrap_model(model).parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(method.classifiers.parameters(), ref_method.classifiers.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_wrapped_torch_optimizer_works_too(data):
    model, optimizer, method = _setup(data)
    model, optimizer, loader = Accelerator(cpu=True).prepare(model, optimizer, _loader(data))
    _train(model, optimizer, method, loader, data, optimizer.optimizer, epochs=1)
    assert method.global_step == 4


def test_stepping_the_accelerated_optimizer_directly(data):
    """method.step(accelerated_optimizer): AcceleratedOptimizer subclasses torch.optim.Optimizer
    without calling its __init__; the method observes the wrapped optimizer's step instead."""
    model, optimizer, method = _setup(data)
    model, optimizer, loader = Accelerator(cpu=True).prepare(model, optimizer, _loader(data))
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, optimizer, method, loader, data, optimizer, epochs=1)
    assert method.global_step == len(loader)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_bf16(data):
    model, optimizer, method = _setup(data)
    before = [p.detach().clone() for p in model.parameters()]
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model, optimizer, loader = accelerator.prepare(model, optimizer, _loader(data))
    outs = _train(model, optimizer, method, loader, data, _step_function(optimizer))
    assert outs[-1].prediction.dtype == torch.bfloat16 and method.global_step == 8
    assert {p.dtype for p in method.classifiers.parameters()} == {torch.float32}
    params = list(accelerator.unwrap_model(model).parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params)
    assert all(not torch.equal(a, p) for a, p in zip(before, params))


def test_gradient_accumulation_steps_once_per_accumulated_batch(data):
    model, optimizer, method = _setup(data)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, _loader(data, batch_size=8))
    for inputs, masks, target in loader:
        with accelerator.accumulate(model):
            out = model(inputs, masks)
            loss = method.loss(out, target, data.task.loss(out.prediction, target))
            method.backward(loss / accelerator.gradient_accumulation_steps)
            if accelerator.sync_gradients:
                method.step(_step_function(optimizer))
                optimizer.zero_grad()
    assert method.global_step == 4  # 8 micro-batches
    assert all(torch.isfinite(p).all() for p in accelerator.unwrap_model(model).parameters())


def _bf16_method(name):
    # greedy from the first step, measuring one step and then re-balancing (model.predict in its loss)
    kwargs = {"greedy": {"start_epoch": 0, "window": 1, "threshold": -1.0}}.get(name, {})
    return build_method(name, **kwargs)


@pytest.mark.parametrize("name", ["ogm_ge", "agm", "greedy"])
def test_readme_recipe_bf16_for_methods_that_call_model_predict(data, name):
    """Issue 17 item 8: Accelerate autocasts only the model's forward; these methods call
    model.predict from their loss on the bf16 features it returned, outside that autocast (fp32 head
    weights: 'mat1 and mat2 must have the same dtype' before the fix)."""
    from cggm.methods.base import EpochContext

    torch.manual_seed(0)
    model = build_model("mlp", data.input_shapes, data.task, feature_dim=8, hidden=16, head_hidden=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    method = _bf16_method(name).bind(model, data.task, optimizer=optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model, optimizer, loader = accelerator.prepare(model, optimizer, _loader(data))
    seen = set()
    for epoch in range(2):
        method.begin_epoch(EpochContext.from_loaders(accelerator.unwrap_model(model), data.task, epoch, 2))
        for inputs, masks, target in loader:
            out = model(inputs, masks)
            loss = method.loss(out, target, data.task.loss(out.prediction, target))
            seen |= {k for k, v in method.records().items() if k.startswith("rebalance/") and float(v) > 0}
            optimizer.zero_grad()
            method.backward(loss)
            method.step(optimizer)
    assert out.prediction.dtype == torch.bfloat16 and method.global_step == 8
    if name == "greedy":
        assert seen  # the re-balancing steps (model.predict on replaced features) ran
    params = list(accelerator.unwrap_model(model).parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params)
    assert all(not torch.equal(a, p) for a, p in zip(before, params))


def test_model_predict_on_bf16_features_outside_autocast_runs_as_under_it(data):
    model = build_model("mlp", data.input_shapes, data.task, feature_dim=8, hidden=16, head_hidden=16)
    inputs, masks, _ = collate([data.train[i] for i in range(8)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(inputs, masks)
        expected = model.predict(out.features, out.masks)
    assert out.features[0].dtype == torch.bfloat16
    got = model.predict(out.features, out.masks)  # outside the autocast the features came from
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
