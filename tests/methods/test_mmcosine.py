"""MMCosine against the equations (spec methods-balancemm.md section 4 (h)), recomputed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import batch, make_optimizer, tiny_data, tiny_model, train_step
from torch import nn

from cggm.methods import UnsupportedSettingError, build_method
from cggm.methods.mmcosine import mmcosine_nce
from cggm.models.base import LateFusionModel
from cggm.models.blocks import ConcatFusion


class _Enc(nn.Module):
    def __init__(self, d_in, d):
        super().__init__()
        self.lin = nn.Linear(d_in, d)

    def forward(self, x, mask=None):
        return self.lin(x.flatten(1))


def linear_model(data, seed=0, widths=(5, 7, 3)):
    torch.manual_seed(seed)
    encs = {m: _Enc(math.prod(data.input_shapes[m]), widths[i]) for i, m in enumerate(data.modalities)}
    head = nn.Linear(sum(widths[:len(encs)]), data.task.num_outputs)
    return LateFusionModel(encs, ConcatFusion(), head, head_layer=head)


def hand_logits(feats, W, widths, s):
    """z_{m,c} = s cos(h_m, w_{m,c}) by explicit norms, column blocks cut by hand."""
    zs, start = [], 0
    for h, d in zip(feats, widths):
        Wm = W[:, start:start + d]
        start += d
        hn = h / torch.sqrt((h * h).sum(1, keepdim=True))
        wn = Wm / torch.sqrt((Wm * Wm).sum(1, keepdim=True))
        zs.append(s * (hn @ wn.t()))
    return zs


@pytest.mark.parametrize("M", [2, 3])
def test_logits_and_loss_equal_hand_computation(M):
    data = tiny_data(M)
    widths = (5, 7, 3)[:M]
    model = linear_model(data)
    method = build_method("mmcosine", scale=15.0).bind(model, data.task, data.modalities)
    assert method.uses_model_head
    inputs, masks, target = batch(data)
    out = model(inputs, masks)
    feats = [h.detach().clone() for h in out.features]
    W = model.head.weight.detach().clone()
    zs = hand_logits(feats, W, widths, 15.0)
    z = sum(zs)
    torch.testing.assert_close(method.eval_prediction(out), z)
    for a, b in zip(method.modality_logits(out), zs):
        torch.testing.assert_close(a, b)
    loss = method.loss(out, target, data.task.loss(out.prediction, target))
    ce = -(z.log_softmax(1)[torch.arange(len(target)), target]).mean()
    torch.testing.assert_close(loss, ce)
    assert (z.abs() <= 15.0 * M + 1e-5).all() and all((zm.abs() <= 15.0 + 1e-5).all() for zm in zs)
    # the bias is unused: no gradient
    loss.backward()
    assert model.head.bias.grad is None
    assert model.head.weight.grad is not None


def test_invariant_to_positive_rescaling():
    data = tiny_data(2)
    model = linear_model(data)
    method = build_method("mmcosine").bind(model, data.task, data.modalities)
    inputs, masks, target = batch(data)
    with torch.no_grad():
        out = model(inputs, masks)
        z0 = method.eval_prediction(out)
        out.features[0].mul_(3.7)
        model.head.weight[2, :5].mul_(0.2)  # one class vector of modality 0
        model.head.weight[:, 5:].mul_(11.0)  # modality 1's whole block
        torch.testing.assert_close(method.eval_prediction(out), z0)


def test_own_head_when_model_head_is_not_split():
    data = tiny_data(2)
    model = tiny_model(data)
    with pytest.raises(UnsupportedSettingError, match="nn.Linear on ConcatFusion"):
        build_method("mmcosine", head="model").bind(model, data.task, data.modalities)
    method = build_method("mmcosine").bind(model, data.task, data.modalities)
    assert not method.uses_model_head
    inputs, masks, target = batch(data)
    out = model(inputs, masks)
    z = method.eval_prediction(out)
    blocks = [b.weight.detach() for b in method.blocks.modules]
    zs = hand_logits([h.detach() for h in out.features], torch.cat(blocks, 1), [8, 8], 10.0)
    torch.testing.assert_close(z, sum(zs))


def test_nce_equals_loop():
    torch.manual_seed(0)
    fa, fb = torch.randn(4, 6), torch.randn(4, 6)
    y = torch.tensor([0, 1, 0, 2])
    tau = 0.1
    total = 0.0
    for i in range(4):
        cos = [float(torch.dot(fa[i], fb[j]) / (fa[i].norm() * fb[j].norm())) for j in range(4)]
        ex = [math.exp(c / tau) for c in cos]
        P = [e / sum(ex) for e in ex]
        same = [j for j in range(4) if y[j] == y[i]]
        diff = [j for j in range(4) if y[j] != y[i]]
        total += sum(-math.log(P[j]) for j in same) / len(same) + sum(-math.log(1 - P[j]) for j in diff) / len(diff)
    torch.testing.assert_close(mmcosine_nce(fa, fb, y, tau), torch.tensor(total / 4), rtol=1e-5, atol=1e-6)
    # the loss adds lam * NCE of the pooled features
    data = tiny_data(2)
    model = linear_model(data, widths=(6, 6))
    m0 = build_method("mmcosine").bind(model, data.task, data.modalities)
    m1 = build_method("mmcosine", lam_nce=0.5).bind(model, data.task, data.modalities)
    inputs, masks, target = batch(data)
    out = model(inputs, masks)
    tl = data.task.loss(out.prediction, target)
    nce = mmcosine_nce(out.features[0], out.features[1], target)
    torch.testing.assert_close(m1.loss(out, target, tl), m0.loss(out, target, tl) + 0.5 * nce)


def test_changes_training_vs_joint():
    data = tiny_data(2)
    results = []
    for name in ("joint", "mmcosine"):
        model = linear_model(data)
        method = build_method(name).bind(model, data.task, data.modalities)
        opt = make_optimizer(model, method, kind="sgd")
        train_step(model, method, opt, *batch(data))
        results.append(torch.cat([p.detach().flatten() for p in model.encoders.parameters()]))
    assert not torch.allclose(results[0], results[1])
