"""The fast transformer layers (cggm.models.fast, attention="fast") against torch's
nn.TransformerEncoderLayer (attention="reference"): same parameters, same function in eval mode and
without dropout (outputs and gradients), the same dropout distribution in training, state_dicts that
load both ways, padded and fully padded sequences handled as the reference handles them."""

import math
import sys

import pytest
import torch
from torch import nn

from cggm import Task, build_model
from cggm.config import ConfigError, load_config
from cggm.models import fast as fast_module
from cggm.models.blocks import SequenceEncoder
from cggm.models.classifiers import SequenceClassifier
from cggm.models.fast import FastEncoder, FastEncoderLayer, dropout_keep, fast_dropout

SHAPES = {"text": (7, 12), "audio": (5, 3), "vision": (6, 4)}
SMALL = dict(d_model=10, encoder_layers=2, fusion_layers=2)


def _pair(heads=5, **options):
    """The same model twice, built from the same seed: reference layers and fast layers."""
    opts = {**SMALL, "heads": heads, **options}
    torch.manual_seed(0)
    ref = build_model("paper_transformer", SHAPES, Task("regression", 1), attention="reference", **opts)
    torch.manual_seed(0)
    fast = build_model("paper_transformer", SHAPES, Task("regression", 1), attention="fast", **opts)
    return ref, fast


def _inputs(batch=4, padding="some", dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = {m: torch.randn((batch, *s), generator=g, dtype=dtype) for m, s in SHAPES.items()}
    if padding == "none":
        return x, None
    masks = {m: torch.ones(batch, s[0], dtype=torch.bool) for m, s in SHAPES.items()}
    masks["text"][0, 4:] = False
    masks["audio"][1, :2] = False
    masks["vision"][2, 3:] = False
    if padding == "full":
        masks["audio"][3] = False  # a sample with no real audio step
    return x, masks


def test_same_parameters_init_and_state_dict_both_ways():
    ref, fast = _pair()
    assert any(isinstance(m, nn.TransformerEncoderLayer) and not isinstance(m, FastEncoderLayer) for m in ref.modules())
    assert not any(isinstance(m, nn.TransformerEncoder) for m in fast.modules())
    assert sum(isinstance(m, FastEncoderLayer) for m in fast.modules()) == 3 * 2 + 2
    a, b = ref.state_dict(), fast.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)  # same seed, same weights
    # loads both ways, strictly, from models built from other seeds
    torch.manual_seed(5)
    other = build_model("paper_transformer", SHAPES, Task("regression", 1), attention="fast", heads=5, **SMALL)
    ref.load_state_dict(other.state_dict())
    assert torch.equal(ref.state_dict()["fusion.encoder.layers.1.linear2.weight"],
                       other.state_dict()["fusion.encoder.layers.1.linear2.weight"])
    fast.load_state_dict(ref.state_dict())
    clf_ref = SequenceClassifier(10, 10, 3, layers=2, attention="reference")
    clf_fast = SequenceClassifier(10, 10, 3, layers=2)
    assert list(clf_ref.state_dict()) == list(clf_fast.state_dict())
    clf_fast.load_state_dict(clf_ref.state_dict())
    clf_ref.load_state_dict(clf_fast.state_dict())


@pytest.mark.parametrize("heads", [5, 2])
@pytest.mark.parametrize("padding", ["none", "some", "full"])
def test_eval_mode_same_function(heads, padding):
    ref, fast = _pair(heads)
    ref.eval()
    fast.eval()
    x, masks = _inputs(padding=padding)
    # with an even head count torch's own inference fast path gives NaN for a sample with no real
    # token (its safe softmax elsewhere gives 0): compare with torch's regular path there
    grad = torch.enable_grad() if padding == "full" and heads % 2 == 0 else torch.no_grad()
    with grad:
        a = ref(x, masks)
    with torch.no_grad():
        b = fast(x, masks)
    assert torch.isfinite(b.prediction).all()
    torch.testing.assert_close(b.prediction, a.prediction.detach(), rtol=1e-5, atol=1e-5)
    for fa, fb in zip(a.features, b.features):
        torch.testing.assert_close(fb, fa.detach(), rtol=1e-5, atol=1e-5)


def test_even_heads_fully_padded_reference_inference_path_is_nan_fast_is_not():
    """Documents the one place the two differ: torch's fused inference path (even head count,
    no grad) returns NaN for a sample whose keys are all padding; the fast layers return what the
    reference returns everywhere else (a zero attention output)."""
    torch.manual_seed(0)
    ref = SequenceEncoder(3, 8, 2, 1, dropout=0.0, attention="reference").eval()
    fast = SequenceEncoder(3, 8, 2, 1, dropout=0.0).eval()
    fast.load_state_dict(ref.state_dict())
    x, mask = torch.randn(2, 4, 3), torch.tensor([[True, True, False, False], [False] * 4])
    with torch.no_grad():
        assert torch.isnan(ref(x, mask)[1]).all()
        out = fast(x, mask)
    torch.testing.assert_close(out, ref(x, mask).detach())  # with grad enabled: torch's regular path


@pytest.mark.parametrize("padding", ["none", "some", "full"])
def test_train_mode_without_dropout_same_outputs_and_gradients(padding):
    zero = dict(dropout=0.0, embed_dropout=0.0, head_dropout=0.0)
    ref, fast = _pair(**zero)
    ref, fast = ref.double().train(), fast.double().train()
    x, masks = _inputs(padding=padding, dtype=torch.float64)
    grads = []
    for model in (ref, fast):
        xs = {m: v.clone().requires_grad_() for m, v in x.items()}
        out = model(xs, masks)
        loss = (out.prediction ** 2).sum() + sum((h * torch.linspace(-1, 1, h.shape[-1], dtype=h.dtype)).sum()
                                                 for h in out.features)
        loss.backward()
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters()},
                      {m: v.grad.clone() for m, v in xs.items()}, out.prediction.detach()))
    (gp_ref, gx_ref, y_ref), (gp_fast, gx_fast, y_fast) = grads
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-10, atol=1e-10)
    assert gp_ref.keys() == gp_fast.keys()
    for name in gp_ref:
        torch.testing.assert_close(gp_fast[name], gp_ref[name], rtol=1e-8, atol=1e-10, msg=name)
    for m in gx_ref:
        assert torch.isfinite(gx_fast[m]).all()
        torch.testing.assert_close(gx_fast[m], gx_ref[m], rtol=1e-8, atol=1e-10)


def test_fully_padded_sample_gets_zero_attention_like_the_reference():
    torch.manual_seed(0)
    ref = SequenceEncoder(3, 10, 5, 2, dropout=0.0, attention="reference")
    fast = SequenceEncoder(3, 10, 5, 2, dropout=0.0)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[True, True, True, False], [False] * 4])
    # the reference: attention output 0 for that sample, so each layer adds only out_proj's bias
    # before its feed-forward block; compare end to end, outputs and input gradients
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ref(xr, mask), fast(xf, mask)
    torch.testing.assert_close(b, a)
    a.pow(2).sum().backward()
    b.pow(2).sum().backward()
    assert torch.isfinite(xf.grad).all()
    torch.testing.assert_close(xf.grad, xr.grad)


def test_padding_bias_is_finite_in_every_dtype_and_masks_exactly():
    from cggm.models.fast import _bias_as, padding_bias

    keep = torch.tensor([[True, False, True], [False, False, False]])
    bias, value_keep = padding_bias(keep, torch.float32)
    assert value_keep.tolist() == [1.0, 0.0]  # the sample with no real key: its values are zeroed
    assert bias[1].eq(0).all() and bias[0, 0] == 0 and bias[0, 2] == 0  # ... and it attends uniformly
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        b = _bias_as(bias, dtype)
        assert b.dtype == dtype and torch.isfinite(b).all()
        scores = torch.tensor([[3.0, 50.0, -2.0]], dtype=dtype) + b[:1]
        assert torch.softmax(scores.float(), -1)[0, 1] == 0  # a padded key gets exactly 0


def test_dropout_keep_rate_quantisation_and_independence():
    like = torch.empty(0)
    n = 1 << 21
    for p in (0.1, 0.15, 0.5):
        keep = dropout_keep((n,), p, like)
        assert keep.dtype == torch.float32 and set(keep.unique().tolist()) <= {0.0, 1.0}
        p_used = round(p * 65536) / 65536
        assert abs(p_used - p) <= 2.0 ** -17
        sd = math.sqrt(p_used * (1 - p_used) / n)
        assert abs((1 - keep.mean().item()) - p_used) < 5 * sd, p
        drop = 1 - keep
        # no dependence between neighbours (lanes of one 64-bit word, and across words)
        for lag in (1, 2, 3, 4, 5):
            both = (drop[:-lag] * drop[lag:]).mean().item()
            assert abs(both - p_used ** 2) < 5 * math.sqrt(p_used ** 2 * (1 - p_used ** 2) / n), (p, lag)
    # the mean is kept: E[dropout(x)] = x
    y = fast_dropout(torch.ones(n), 0.3)
    assert abs(y.mean().item() - 1.0) < 5 * math.sqrt(0.3 / 0.7 / n)
    assert fast_dropout(torch.ones(3), 0.3, training=False).equal(torch.ones(3))
    assert fast_dropout(torch.ones(3), 1.0).equal(torch.zeros(3))


@pytest.fixture(params=["cpu lanes", "torch kernels"])
def dropout_path(request, monkeypatch):
    """The CPU dropout (16-bit lanes) and the one used on other devices (torch's F.dropout and
    SDPA's dropout), both run here on CPU."""
    if request.param == "torch kernels":
        monkeypatch.setattr(fast_module, "LANE_DROPOUT_DEVICES", ())
    return request.param


@pytest.mark.parametrize("site", ["attention", "dropout1", "ff", "dropout2"])
def test_train_mode_dropout_statistics_match_reference(site, dropout_path):
    """One layer, one input repeated over a large batch: each row is an independent draw of the
    dropout masks, so the mean and variance of every output (and input gradient) over the batch
    are estimates of the training-mode distribution; the fast and reference layers must agree
    within noise."""
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(10, 5, 20, dropout=0.0, batch_first=True, norm_first=True)
    fast = FastEncoderLayer(10, 5, 20, dropout=0.0)
    fast.load_state_dict(ref.state_dict())
    for layer in (ref, fast):
        if site == "attention":
            layer.self_attn.dropout = 0.4
        else:
            getattr(layer, {"dropout1": "dropout1", "ff": "dropout", "dropout2": "dropout2"}[site]).p = 0.4
    n = 6000
    x0 = torch.randn(1, 5, 10)
    pad = torch.tensor([[False, False, False, True, False]]).expand(n, 5)
    w = torch.randn(5, 10)
    outs, grads = [], []
    for stack in (nn.TransformerEncoder(ref, 1, enable_nested_tensor=False), FastEncoder(fast, 1)):
        x = x0.repeat(n, 1, 1).requires_grad_()
        out = stack(x, src_key_padding_mask=pad)
        (out * w).sum().backward()  # each row's input gradient is its own draw
        outs.append(out.detach())
        grads.append(x.grad)
    for a, b in (outs, grads):
        z = (a.mean(0) - b.mean(0)) / torch.sqrt((a.var(0) + b.var(0)) / n)
        assert z.abs().max() < 5.5, z.abs().max()
        ratio = b.var(0).sum() / a.var(0).sum()
        assert a.var(0).sum() > 1e-3 and 0.9 < ratio < 1.1, ratio  # dropout is on, at the same strength


def test_fused_dropout_nodes_have_the_gradients_of_their_composition():
    from cggm.models.fast import _ReluKeep, _SoftmaxKeep

    torch.manual_seed(0)
    keep = (torch.rand(3, 4, 6) > 0.3).double()
    for fused, plain in ((_SoftmaxKeep.apply, lambda s, k: torch.softmax(s, -1) * k),
                         (_ReluKeep.apply, lambda h, k: torch.relu(h) * k)):
        s = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
        g = torch.randn(3, 4, 6, dtype=torch.float64)
        a = fused(s, keep)
        (ga,) = torch.autograd.grad(a, s, g.clone())
        b = plain(s, keep)
        (gb,) = torch.autograd.grad(b, s, g)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ga, gb)
        assert torch.autograd.gradcheck(lambda t, f=fused: f(t, keep), (s,))


def test_embed_dropout_statistics_match_reference(dropout_path):
    torch.manual_seed(0)
    ref = SequenceEncoder(3, 10, 5, 1, dropout=0.0, embed_dropout=0.4, attention="reference")
    fast = SequenceEncoder(3, 10, 5, 1, dropout=0.0, embed_dropout=0.4)
    fast.load_state_dict(ref.state_dict())
    n = 6000
    x = torch.randn(1, 4, 3).expand(n, 4, 3)
    with torch.no_grad():
        a, b = ref(x), fast(x)
    z = (a.mean(0) - b.mean(0)) / torch.sqrt((a.var(0) + b.var(0)) / n)
    assert z.abs().max() < 5.5
    assert 0.9 < b.var(0).sum() / a.var(0).sum() < 1.1


def test_training_step_has_no_host_sync(monkeypatch):
    model = build_model("paper_transformer", SHAPES, Task("regression", 1), heads=5, **SMALL)
    x, masks = _inputs(padding="full")
    y = torch.randn(4)
    calls = []
    for name in ["item", "tolist", "cpu", "numpy", "__float__", "__bool__", "__int__", "__index__"]:
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _orig=original, **k):
            calls.append((_name, sys._getframe(1).f_code.co_filename))
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    out = model(x, masks)
    (out.prediction.squeeze(1) - y).abs().mean().backward()
    monkeypatch.undo()
    assert not calls, calls


def test_attention_option_in_builders_and_config():
    for arch in ("transformer", "paper_transformer"):
        model = build_model(arch, SHAPES, Task("classification", 3), attention="reference", d_model=10)
        assert isinstance(model.fusion.encoder, nn.TransformerEncoder)
        model = build_model(arch, SHAPES, Task("classification", 3), d_model=10)
        assert isinstance(model.fusion.encoder, FastEncoder)  # the default
    with pytest.raises(ValueError, match="attention"):
        build_model("transformer", SHAPES, Task("classification", 3), attention="flash")
    for preset in ("mosi", "iemocap", "food101"):
        cfg = load_config(preset=preset, overrides=["model.options.attention=reference"])
        assert cfg["model"]["options"]["attention"] == "reference"
    with pytest.raises(ConfigError, match="attention"):
        load_config(preset="mosi", overrides=["model.options.attention=flash"])


def test_bf16_autocast_runs_and_stays_close():
    ref, fast = _pair()
    fast.load_state_dict(ref.state_dict())
    fast.eval()
    x, masks = _inputs()
    with torch.no_grad():
        full = fast(x, masks).prediction
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fast(x, masks).prediction
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), full, rtol=0.1, atol=0.1)
    fast.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x, masks)
    out.prediction.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.grad is not None)
