"""OGM+ (TPAMI use_OGM_plus) against a hand recomputation of its gradients."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import batch, context, make_optimizer, tiny_data, train_step
from test_mmcosine import linear_model

from cggm.methods import UnsupportedSettingError, build_method


def _model(strong_first=True):
    data = tiny_data(2)
    model = linear_model(data, widths=(5, 7))
    with torch.no_grad():
        weak = slice(5, 12) if strong_first else slice(0, 5)
        strong = slice(0, 5) if strong_first else slice(5, 12)
        model.head.weight[:, strong] *= 6.0
        model.head.weight[:, weak] *= 0.05
    return data, model


def _joint_grads(model, data, inputs, masks, target):
    model.zero_grad()
    out = model(inputs, masks)
    data.task.loss(out.prediction, target).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _hand_scores(model, inputs, masks, target):
    """s_m = sum_i softmax(W_m h_m + b)[y_i]: the other modality's features zeroed."""
    with torch.no_grad():
        out = model(inputs, masks)
        W, b = model.head.weight, model.head.bias
        s = []
        for h, cols in zip(out.features, (slice(0, 5), slice(5, 12))):
            z = h @ W[:, cols].t() + b
            s.append(sum(math.exp(z[i, target[i]]) / float(z[i].exp().sum()) for i in range(len(target))))
    return s


@pytest.mark.parametrize("strong_first", [True, False])
def test_weak_encoder_gradient_times_boost_dominant_and_head_unchanged(strong_first):
    data, model = _model(strong_first)
    inputs, masks, target = batch(data)
    s = _hand_scores(model, inputs, masks, target)
    weak = 1 if s[0] > s[1] else 0
    joint = _joint_grads(model, data, inputs, masks, target)
    method = build_method("ogm_plus", start_epoch=0).bind(model, data.task, data.modalities)
    model.zero_grad()
    out = model(inputs, masks)
    method.backward(method.loss(out, target, data.task.loss(out.prediction, target)))
    weak_name = data.modalities[weak]
    for n, p in model.named_parameters():
        factor = 4.0 if n.startswith(f"encoders.{weak_name}.") else 1.0
        torch.testing.assert_close(p.grad, joint[n] * factor, rtol=1e-6, atol=0)
    method.skip()


def test_window_defaults_and_two_modalities_only():
    data, model = _model()
    inputs, masks, target = batch(data)
    joint = _joint_grads(model, data, inputs, masks, target)
    method = build_method("ogm_plus").bind(model, data.task, data.modalities)
    for epoch in (5, 61):  # the authors' warm-up (epoch <= 5) and window (up to 60)
        method.epoch = epoch
        model.zero_grad()
        out = model(inputs, masks)
        method.backward(method.loss(out, target, data.task.loss(out.prediction, target)))
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, joint[n], rtol=0, atol=0)
        method.skip()
    data3 = tiny_data(3)
    with pytest.raises(UnsupportedSettingError):
        build_method("ogm_plus").bind(linear_model(data3), data3.task, data3.modalities)


def test_changes_training_vs_joint():
    results = []
    for name, kw in (("joint", {}), ("ogm_plus", {"start_epoch": 0})):
        data, model = _model()
        method = build_method(name, **kw).bind(model, data.task, data.modalities)
        opt = make_optimizer(model, method, kind="sgd")
        method.begin_epoch(context(data, model, 0))
        train_step(model, method, opt, *batch(data))
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(results[0], results[1])
