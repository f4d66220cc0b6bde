"""CGGM's rules and metric against a plain numpy recomputation of their equations (issue 17, "Tests
that cannot fail where they should"): the references below are written from the equations in
cggm/methods/cggm/rules.py's docstring and parts.py's, never by calling the code under test.

* the under-use rule's EMA is bias-corrected (m_t / (1 - beta^t)), read at every step of a
  sequence with beta = 0.9 (where the correction is large for many steps);
* the robust rule's window is K steps: delta_t = max(m_t - m_{t-K}, 0), with m_s = m_1 for s < 1,
  over a sequence three windows long, with non-trivial beta and window;
* the official/sign-accuracy metric counts a zero label as negative (a batch with zero labels).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cggm.methods.cggm.parts import Epsilon
from cggm.methods.cggm.rules import RobustRule, UnderuseRule
from cggm.types import Task


def _metrics(steps: int, m: int, seed: int) -> np.ndarray:
    """A metric sequence [steps, m] that drifts up at different rates, with noise (so deltas over
    different windows differ and some are clamped at 0)."""
    rng = np.random.default_rng(seed)
    rates = np.linspace(0.004, 0.03, m)
    t = np.arange(1, steps + 1)[:, None]
    return np.clip(0.3 + rates * t + rng.normal(0, 0.04, (steps, m)), 0, 1)


def _ema_corrected(eps: np.ndarray, beta: float) -> np.ndarray:
    """m_t = EMA_beta(eps)_t / (1 - beta^t), in float64."""
    ema, out = np.zeros(eps.shape[1]), []
    for t, e in enumerate(eps, start=1):
        ema = beta * ema + (1 - beta) * e
        out.append(ema / (1 - beta ** t))
    return np.array(out)


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max())
    return z / z.sum()


def test_underuse_rule_reads_its_ema_bias_corrected():
    rho, beta, T, M = 1.3, 0.9, 0.05, 3
    eps = _metrics(30, M, seed=0)
    levels = _ema_corrected(eps, beta)
    rule = UnderuseRule(rho, beta=beta, temperature=T)
    for t, e in enumerate(eps):
        B = rule(torch.tensor(e, dtype=torch.float32)).double().numpy()
        ref = rho * (M - 1) * _softmax(-(levels[t] - levels[t].mean()) / T)
        np.testing.assert_allclose(B, ref, rtol=2e-4, atol=1e-6, err_msg=f"step {t + 1}")
    # the reference itself: at step 1 the corrected EMA is the metric itself
    np.testing.assert_allclose(levels[0], eps[0], rtol=1e-12)


@pytest.mark.parametrize("window", [3, 7])
def test_robust_rule_window_is_K_steps(window):
    rho, beta, tau, M = 1.3, 0.6, 0.002, 3
    steps = 3 * window + 4
    eps = _metrics(steps, M, seed=window)
    smoothed = _ema_corrected(eps, beta)
    rule = RobustRule(rho, beta=beta, window=window, tau=tau)
    nonuniform = 0
    for t in range(steps):  # t is 0-based: m_{t-K} is smoothed[t - K], the first value before that
        B = rule(torch.tensor(eps[t], dtype=torch.float32)).double().numpy()
        past = smoothed[max(t - window, 0)]
        delta = np.maximum(smoothed[t] - past, 0)
        total = delta.sum()
        ref = rho * (total - delta + tau * (M - 1) / M) / (total + tau)
        np.testing.assert_allclose(B, ref, rtol=1e-4, atol=1e-5, err_msg=f"step {t + 1}")
        nonuniform += not np.allclose(ref, rho * (M - 1) / M, atol=1e-3)
    assert nonuniform > steps // 2  # the inputs exercise the window: B is far from uniform most steps


@pytest.mark.parametrize("name", ["sign_accuracy", "official"])
def test_sign_metric_counts_zero_labels_negative(name):
    eps = Epsilon(name)
    eps.bind(Task("regression", 1))
    target = torch.tensor([[0.0], [0.0], [0.0], [1.2], [-0.4], [2.0], [0.0], [-1.0]])
    pa = torch.tensor([[-0.3], [-1.0], [0.5], [0.7], [-0.2], [-0.1], [-0.6], [0.3]])
    pb = torch.tensor([[0.2], [0.4], [0.1], [0.9], [0.3], [1.0], [-0.5], [-0.2]])
    got = eps([pa, pb], target).double().numpy()
    # plain Python: a label is positive only if > 0 (0 is negative), likewise a prediction
    ref = [sum((float(p) > 0) == (float(y) > 0) for p, y in zip(pred.flatten(), target.flatten())) / 8
           for pred in (pa, pb)]
    zero_positive = [sum((float(p) > 0) == (float(y) >= 0) for p, y in zip(pred.flatten(), target.flatten())) / 8
                     for pred in (pa, pb)]
    assert ref == [5 / 8, 4 / 8] and zero_positive == [3 / 8, 6 / 8]  # the zero labels decide both values
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-7)
