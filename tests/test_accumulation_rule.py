"""Gradient accumulation with CGGM (scale_on="update"): the rule commits the micro-batches' *mean*
metric, not the first micro-batch's nor their sum (issue 17). The reference is recomputed
independently: each micro-batch's classifier accuracy from copies of the model and classifiers
taken before the step, their mean, and the robust rule's EMA and window slot advanced in numpy from
the rule's state copied before the step (m = beta m + (1 - beta) eps; the slot steps % K holds the
bias-corrected value)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from _twomodal import TASK, TwoModal

from cggm import CGGM, ModelOutput

BETA, WINDOW = 0.7, 3




def _accuracies(model, classifiers, a, v, y) -> np.ndarray:
    with torch.no_grad():
        _, h = model(a, v)
        return np.array([float((clf(x).argmax(1) == y).double().mean()) for clf, x in zip(classifiers, h)])


def test_rule_commits_the_mean_metric_of_the_micro_batches():
    torch.manual_seed(0)
    model = TwoModal()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    method = CGGM(head_layer=model.fc, lam=0.0, direction="off", scale_on="update",
                  rule_options={"beta": BETA, "window": WINDOW}, classifier_lr=5e-2).bind(
        model, TASK, ["audio", "video"], optimizer=opt,
        modality_parameters=[model.audio.parameters(), model.video.parameters()])
    g = torch.Generator().manual_seed(1)
    checked = 0
    for step in range(5):
        a, v = torch.randn(16, 10, generator=g), torch.randn(16, 12, generator=g)
        y = torch.randint(0, 4, (16,), generator=g)
        halves = [(a[:8], v[:8], y[:8]), (a[8:], v[8:], y[8:])]
        if method.classifiers is not None:  # (built on the first batch)
            model0, clfs0 = copy.deepcopy(model), copy.deepcopy(method.classifiers)
            ema0 = np.zeros(2) if method.rule.ema is None else method.rule.ema.double().numpy().copy()
            steps0 = method.rule.steps
            eps = np.stack([_accuracies(model0, clfs0, *half) for half in halves])  # [2 micro-batches, M]
        opt.zero_grad()
        for a_, v_, y_ in halves:
            pred, h = model(a_, v_)
            method.backward(method.loss(ModelOutput(pred, h), y_, TASK.loss(pred, y_)) / 2)
        method.step(opt)
        if step == 0:
            continue
        assert not np.allclose(eps[0], eps[1])  # the micro-batches' metrics differ: first != mean != sum
        mean = eps.mean(0)
        ema = BETA * ema0 + (1 - BETA) * mean
        np.testing.assert_allclose(method.rule.ema.double().numpy(), ema, rtol=1e-6, atol=1e-7)
        assert method.rule.steps == steps0 + 1
        slot = (steps0 + 1) % WINDOW
        np.testing.assert_allclose(method.rule.history[slot].double().numpy(), ema / (1 - BETA ** (steps0 + 1)),
                                   rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(method.records()["eps/audio"].double().item(), mean[0], atol=1e-7)
        checked += 1
    assert checked == 4
