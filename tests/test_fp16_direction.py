"""fp16 with a GradScaler: the direction term's double backward (the gradient of L_gm through g_F =
dL_task/dW_F) must not overflow fp16 where the task's own backward does not. Its gradient with
respect to g_F grows like 1/|g_F|, so a near-fitted head (tiny g_F) at the default loss scale 65536
is the case that overflowed (issue 17, item 6). Reference: Eq. 12 recomputed in float64 from the
equations (cosine written out), without autocast."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cggm.methods.cggm import GradientCosine

N, D, C = 32, 32, 4
LAM, B = 0.2, torch.tensor([0.65, 0.65])
SCALE = 65536.0  # torch.amp.GradScaler's initial scale


def near_fitted():
    """Features, labels, the fused head and two classifiers' last layers, with the head fitted so
    well that |g_F| is ~1e-3 (the batch's predicted probability of the label is > 0.999)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, C, (N,), generator=g)
    h = 3.0 * F.one_hot(y, D).float() + 0.3 * torch.randn(N, D, generator=g)
    head = nn.Linear(D, C)
    clfs = [nn.Linear(D, C) for _ in range(2)]
    with torch.no_grad():
        head.weight.copy_(3.0 * torch.eye(C, D) + 0.1 * torch.randn(C, D, generator=g))
        head.bias.zero_()
        for clf in clfs:
            clf.weight.copy_(0.5 * torch.randn(C, D, generator=g))
    return h, y, head, clfs


def scaled_grads(h, y, head, clfs, dtype, rescale, scale):
    h = h.clone().requires_grad_(True)
    cggm = SimpleNamespace(head_layer=head, classifiers=[SimpleNamespace(last=c) for c in clfs])
    head.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        task = F.cross_entropy(head(h), y)
        clf_loss = sum(F.cross_entropy(c(h.detach()), y) for c in clfs)
        l_gm, _ = GradientCosine(rescale=rescale).loss(cggm, task, B, clf_loss)
        loss = task + LAM * l_gm
    (scale * loss).backward()
    return h.grad / scale, head.weight.grad / scale


def reference(h, y, head, clfs):
    """d(L_task + lam L_gm)/d(h, W_F) in float64, Eq. 12 written out."""
    h = h.double().clone().requires_grad_(True)
    W, b = head.weight.detach().double().clone().requires_grad_(True), head.bias.detach().double()
    task = F.cross_entropy(h @ W.T + b, y)
    (g_F,) = torch.autograd.grad(task, W, create_graph=True)
    l_gm = 0.0
    for c in clfs:
        Wc = c.weight.detach().double().clone().requires_grad_(True)
        (g_i,) = torch.autograd.grad(F.cross_entropy(h.detach() @ Wc.T + c.bias.detach().double(), y), Wc)
        cos = (g_F * g_i).sum() / (g_F.norm() * g_i.norm())
        l_gm = l_gm + (0.65 - 0.65 * cos) / 2
    gh, gW = torch.autograd.grad(task + LAM * l_gm, [h, W])
    return gh, gW, float(g_F.norm())


def test_the_state_is_near_fitted():
    h, y, head, clfs = near_fitted()
    *_, norm = reference(h, y, head, clfs)
    assert norm < 3e-3


def test_fp16_direction_term_does_not_overflow_at_the_default_scale():
    h, y, head, clfs = near_fitted()
    gh, gW = scaled_grads(h, y, head, clfs, torch.float16, None, SCALE)  # (rescale=None: on under fp16)
    assert torch.isfinite(gh).all() and torch.isfinite(gW).all()
    rh, rW, _ = reference(h, y, head, clfs)
    # the fp16 result is Eq. 12's gradient to fp16 accuracy
    assert torch.allclose(gh.double(), rh, rtol=0.05, atol=0.01 * float(rh.abs().max()))  # (measured 0.2%)
    assert torch.allclose(gW.double(), rW, rtol=0.05, atol=0.01 * float(rW.abs().max()))


def test_without_the_rescaling_fp16_overflows_here():
    """The case above is the failing one: the same computation without the rescaling is inf."""
    h, y, head, clfs = near_fitted()
    gh, gW = scaled_grads(h, y, head, clfs, torch.float16, False, SCALE)
    assert not (torch.isfinite(gh).all() and torch.isfinite(gW).all())


@pytest.mark.parametrize("rescale", [False, True])
def test_fp32_gradient_is_eq12_exactly_with_or_without_the_rescaling(rescale):
    h, y, head, clfs = near_fitted()
    gh, gW = scaled_grads(h, y, head, clfs, torch.float32, rescale, 1.0)
    rh, rW, _ = reference(h, y, head, clfs)
    # (g_F is a sum that nearly cancels: measured 2e-5 of the largest entry in fp32)
    assert torch.allclose(gh.double(), rh, rtol=1e-3, atol=1e-4 * float(rh.abs().max()))
    assert torch.allclose(gW.double(), rW, rtol=1e-3, atol=1e-4 * float(rW.abs().max()))


def test_fp32_rescaling_by_a_power_of_two_changes_no_bit():
    h, y, head, clfs = near_fitted()
    a = scaled_grads(h, y, head, clfs, torch.float32, False, 1.0)
    b = scaled_grads(h, y, head, clfs, torch.float32, True, 1.0)
    assert all(torch.equal(x, z) for x, z in zip(a, b))
