"""torch.compile with CGGM on CPU (torch 2.13): compiling each modality's encoder works with the
default options and trains like eager; compiling the whole model fails on the direction term's
double backward, and works only without it and with B on updates. The whole-model cases use
the aot_eager backend (AOTAutograd is what refuses double backward; no code generation needed)."""

from __future__ import annotations

import pytest
import torch

from cggm import ProtocolError
from cggm.data import BatchIterator, load_dataset
from cggm.methods import build_method
from cggm.models import build_model


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", dim=8, n_train=64, n_val=16, n_test=16)


def _run(data, compile_encoders=False, whole=None, optimizer="adam", steps=4, **options):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shapes, data.task, feature_dim=8, hidden=16, head_hidden=16)
    if compile_encoders:
        for encoder in model.encoders.values():
            encoder.compile()  # in place: the state_dict keys stay those of the eager model
    forward = model if whole is None else torch.compile(model, backend=whole)
    opt = (torch.optim.Adam(model.parameters(), lr=1e-2) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.1))
    method = build_method("cggm", **options).bind(model, data.task, optimizer=opt)
    for batch in list(BatchIterator(data.train, 16, True))[:steps]:
        inputs, masks, target = batch
        out = forward(inputs, masks)
        loss = method.loss(out, target, data.task.loss(out.prediction, target))
        opt.zero_grad(set_to_none=True)
        method.backward(loss)
        method.step(opt)
    return model, method


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])  # B on updates / B on gradients (hooks on the features)
def test_compiled_encoders_train_like_eager(data, optimizer):
    eager, eager_method = _run(data, optimizer=optimizer)
    compiled, method = _run(data, compile_encoders=True, optimizer=optimizer)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert method.global_step == 4 and "L_gm" in method.records()
    for k, v in compiled.state_dict().items():
        torch.testing.assert_close(v, eager.state_dict()[k], rtol=1e-4, atol=1e-5, msg=k)
    for k, v in method.records().items():
        torch.testing.assert_close(v, eager_method.records()[k], rtol=1e-4, atol=1e-5, msg=k)


def test_whole_model_compile_fails_on_the_direction_terms_double_backward(data):
    with pytest.raises(RuntimeError, match="does not currently support double backward"):
        _run(data, whole="aot_eager", steps=1)


@pytest.mark.parametrize("direction", ["off", "weight"])  # no double backward: none, or the official code's
def test_whole_model_compile_without_the_gradient_direction_term(data, direction):
    eager, _ = _run(data, direction=direction)
    compiled, method = _run(data, whole="aot_eager", direction=direction)
    assert method.where_B_acts() == "update"  # Adam: B scales the update, after the backward pass
    for k, v in compiled.state_dict().items():
        torch.testing.assert_close(v, eager.state_dict()[k], rtol=1e-5, atol=1e-6, msg=k)


def test_whole_model_compile_with_B_on_gradients_fails(data):
    """SGD: B's hooks sit on the feature tensors the compiled model returns, which its head (inside
    the graph) never reads. The hook is called with grad=None, so it never fires, and the step
    stops with the ProtocolError meant for this case rather than train without B."""
    with pytest.raises(ProtocolError, match="no gradient flowed"):
        _run(data, whole="aot_eager", direction="off", optimizer="sgd", steps=1)
