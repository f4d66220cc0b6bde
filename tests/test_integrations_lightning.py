"""cggm.integrations.lightning: every method inside a real lightning.Trainer (CPU), its checkpoints
and resume, and the step through Lightning's precision plugins (bf16, fp16 with a GradScaler)."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("lightning", reason="the Lightning integration needs the 'lightning' extra: "
                                        "pip install -e '.[lightning]'")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

from cggm.data import load_dataset  # noqa: E402
from cggm.data.base import BatchIterator  # noqa: E402
from cggm.integrations.lightning import MethodModule, NonFiniteError, dataloader  # noqa: E402
from cggm.methods import build_method, list_methods  # noqa: E402
from cggm.models import build_model  # noqa: E402
from cggm.training import TrainConfig, Trainer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", dim=8, n_train=64, n_val=16, n_test=16)


def _model(data, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return build_model("mlp", data.input_shapes, data.task, feature_dim=8, hidden=16, head_hidden=16, dropout=dropout)


def _trainer(root, epochs, **kwargs):
    kwargs.setdefault("callbacks", [ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1)])
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=root, **kwargs)


def _fit(module, data, trainer, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, dataloader(data.train, 16, shuffle=True, seed=3), dataloader(data.val, 16), **kwargs)
    return trainer


def _snapshot(module):
    """Everything that must be equal after a resume: the model, the method's own modules and state."""
    state = {f"model.{k}": v.detach().clone() for k, v in module.model.state_dict().items()}
    # the method's whole declared state (modules built or waiting to be, their optimizers, statistics)
    state.update({f"method.{k}": v for k, v in _tensors(module.method.state_dict()).items()})
    return state


def _tensors(state, prefix=""):
    if isinstance(state, torch.Tensor):
        return {prefix: state.detach().clone()}
    out = {}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for k, v in items:
        out.update(_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _assert_same(a, b, what=""):
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{what} {k}")


def test_resume_from_checkpoint_ends_like_the_uninterrupted_run(data, tmp_path):
    """CGGM (its classifiers, their Adam state, the rule's history, the direction term) in 2 epochs
    with dropout, against 1 epoch, a checkpoint, and a fresh process-like resume for the 2nd."""
    ref = MethodModule(_model(data, dropout=0.1), build_method("cggm"), data.task, lr=1e-2)
    ref_trainer = _fit(ref, data, _trainer(tmp_path / "ref", 2))
    assert ref_trainer.global_step == ref.method.global_step == 8
    first = MethodModule(_model(data, dropout=0.1), build_method("cggm"), data.task, lr=1e-2)
    _fit(first, data, _trainer(tmp_path / "run", 1))
    ckpt = tmp_path / "run" / "epoch=0.ckpt"
    saved = torch.load(ckpt, weights_only=False)["cggm"]
    assert saved["method_name"] == "cggm" and {"auxiliary", "rule"} <= set(saved["method"])
    torch.manual_seed(1234)  # the resumed run must not depend on the process's RNG state or the model's init
    resumed = MethodModule(_model(data, seed=7, dropout=0.1), build_method("cggm"), data.task, lr=1e-2)
    trainer = _fit(resumed, data, _trainer(tmp_path / "run2", 2), ckpt_path=str(ckpt))
    assert trainer.global_step == 8 and resumed.method.global_step == 8
    _assert_same(_snapshot(resumed), _snapshot(ref))
    _assert_same({k: v for k, v in resumed.method.state_dict()["rule"].items() if torch.is_tensor(v)},
                 {k: v for k, v in ref.method.state_dict()["rule"].items() if torch.is_tensor(v)})


def test_resume_without_the_rng_state_differs(data, tmp_path):
    """The check above can fail: without the saved RNG state, the resumed dropout masks differ."""
    ref = MethodModule(_model(data, dropout=0.1), build_method("cggm"), data.task, lr=1e-2)
    _fit(ref, data, _trainer(tmp_path / "ref", 2))
    first = MethodModule(_model(data, dropout=0.1), build_method("cggm"), data.task, lr=1e-2, save_rng=False)
    _fit(first, data, _trainer(tmp_path / "run", 1))
    torch.manual_seed(1234)
    resumed = MethodModule(_model(data, dropout=0.1), build_method("cggm"), data.task, lr=1e-2, save_rng=False)
    _fit(resumed, data, _trainer(tmp_path / "run2", 2), ckpt_path=str(tmp_path / "run" / "epoch=0.ckpt"))
    assert not torch.equal(resumed.model.head.out.weight, ref.model.head.out.weight)


def test_lightning_run_equals_cggm_engine(data, tmp_path):
    """Same model, optimizer, batches (dataloader() is the engine's order): the same weights as
    cggm.training.Trainer after 2 epochs, so nothing of the method is lost in Lightning's loop."""
    module = MethodModule(_model(data), build_method("cggm"), data.task, lr=1e-2)
    torch.manual_seed(3)  # the engine seeds the run with config.seed (CGGM's classifiers are drawn at the first step)
    _fit(module, data, _trainer(tmp_path / "pl", 2))
    result = Trainer(_model(data), build_method("cggm"), data,
                     TrainConfig(epochs=2, batch_size=16, lr=1e-2, seed=3, progress=False)).fit()
    engine = result.extra["final_weights"]
    for k, v in module.model.state_dict().items():
        torch.testing.assert_close(v, engine[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("name", list_methods())
def test_every_method_trains_and_resumes(data, tmp_path, name):
    """Any registered method: trains in a real Trainer (its epoch hooks and its own modules
    included) and a resume from the epoch-1 checkpoint ends like the uninterrupted 2-epoch run."""
    ref = MethodModule(_model(data), build_method(name), data.task, lr=1e-2)
    before = {k: v.clone() for k, v in ref.model.state_dict().items()}
    trainer = _fit(ref, data, _trainer(tmp_path / "ref", 2, num_sanity_val_steps=0))
    assert trainer.global_step == 8 and ref.method.global_step == 8
    assert any(not torch.equal(before[k], v) for k, v in ref.model.state_dict().items()), "no weight moved"
    assert all(torch.isfinite(v).all() for v in ref.model.state_dict().values())
    _fit(MethodModule(_model(data), build_method(name), data.task, lr=1e-2), data,
         _trainer(tmp_path / "run", 1, num_sanity_val_steps=0))
    torch.manual_seed(1234)
    resumed = MethodModule(_model(data, seed=7), build_method(name), data.task, lr=1e-2)
    _fit(resumed, data, _trainer(tmp_path / "run2", 2, num_sanity_val_steps=0),
         ckpt_path=str(tmp_path / "run" / "epoch=0.ckpt"))
    _assert_same(_snapshot(resumed), _snapshot(ref), name)


def _manual_fp16(data, name, scaler, epochs=2):
    """The README's fp16 protocol in a plain loop: autocast, method.backward(scaler.scale(loss)),
    method.step(opt, scaler=scaler), scaler.update()."""
    model = _model(data)
    method = build_method(name).bind(model, data.task)
    opt = torch.optim.Adam(method.param_groups(model), lr=1e-2)
    method.set_optimizer(opt)
    for epoch in range(epochs):
        for inputs, masks, target in BatchIterator(data.train, 16, True, seed=3, epoch=epoch):
            with torch.autocast("cpu", dtype=torch.float16):
                out = model(inputs, masks)
                loss = method.loss(out, target, data.task.loss(out.prediction, target))
            opt.zero_grad(set_to_none=True)
            method.backward(scaler.scale(loss))
            method.step(opt, scaler=scaler)
            scaler.update()
    return model, method


@pytest.mark.parametrize("name", ["cggm", "ume"])  # ume: auxiliary heads trained from the scaled loss
def test_fp16_grad_scaler_steps_like_the_plain_protocol(data, tmp_path, name):
    """precision 16-mixed (Lightning refuses '16-mixed' on CPU, so its plugin is given with a CPU
    GradScaler): the scaler skips the first overflowing steps, the method sees them as skipped
    (nothing committed), and the run equals the plain fp16 loop of the README."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=2)
    module = MethodModule(_model(data), build_method(name), data.task, lr=1e-2)
    trainer = _fit(module, data, _trainer(tmp_path, 2, num_sanity_val_steps=0,
                                          plugins=[MixedPrecision("16-mixed", "cpu", scaler)]))
    assert trainer.global_step == 8  # Lightning counts every step, as with opt.step()
    assert 0 < module.method.global_step < 8  # the skipped ones were not committed
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=2)
    model, method = _manual_fp16(data, name, ref_scaler)
    assert module.method.global_step == method.global_step and scaler.get_scale() == ref_scaler.get_scale()
    for a, b in zip(module.model.parameters(), model.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0)
    for (k, a), b in zip(module.method.modules().items(), method.modules().values()):
        _assert_same(a.state_dict(), b.state_dict(), k)


def test_bf16_mixed_precision(data, tmp_path):
    module = MethodModule(_model(data), build_method("cggm"), data.task, lr=1e-2)
    before = module.model.head.out.weight.detach().clone()
    _fit(module, data, _trainer(tmp_path, 1, precision="bf16-mixed", num_sanity_val_steps=0))
    assert module.method.global_step == 4
    assert {p.dtype for p in module.model.parameters()} == {torch.float32}
    assert {p.dtype for p in module.method.classifiers.parameters()} == {torch.float32}
    assert not torch.equal(before, module.model.head.out.weight)
    assert all(torch.isfinite(p).all() for p in module.model.parameters())


def test_nonfinite_loss_stops_or_is_skipped(data, tmp_path):
    module = MethodModule(_model(data), build_method("cggm"), data.task, optimizer="sgd", lr=1e30)
    with pytest.raises(NonFiniteError, match="Training diverged at step 1"):
        _fit(module, data, _trainer(tmp_path / "a", 1, num_sanity_val_steps=0))
    module = MethodModule(_model(data), build_method("cggm"), data.task, optimizer="sgd", lr=1e30,
                          on_nonfinite="skip")
    _fit(module, data, _trainer(tmp_path / "b", 1, num_sanity_val_steps=0))
    assert module.method.global_step + module.skipped_steps == 4 and module.skipped_steps > 0


def test_gradient_clipping_is_applied_after_the_method_edits(data, tmp_path):
    module = MethodModule(_model(data), build_method("cggm"), data.task, optimizer="sgd", lr=0.5,
                          gradient_clip_val=1e-3)
    norms = []
    module.on_before_optimizer_step = lambda opt: norms.append(  # Lightning calls it inside opt.step()
        float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.model.parameters()
                                                    if p.grad is not None]))))
    _fit(module, data, _trainer(tmp_path, 1, num_sanity_val_steps=0))
    assert len(norms) == 4 and max(norms) <= 1e-3 * 1.0001


def test_checkpoint_of_another_method_is_refused(data, tmp_path):
    _fit(MethodModule(_model(data), build_method("cggm"), data.task), data, _trainer(tmp_path / "a", 1))
    other = MethodModule(_model(data), build_method("ogm_ge"), data.task)
    with pytest.raises(ValueError, match="written with method 'cggm'"):
        _fit(other, data, _trainer(tmp_path / "b", 2), ckpt_path=str(tmp_path / "a" / "epoch=0.ckpt"))


def test_test_from_a_checkpoint(data, tmp_path):
    """trainer.test(ckpt_path=...) on a fresh module evaluates the checkpoint's model, and CGGM's
    classifiers restored from it (built at the first evaluated batch, under inference mode) give
    the same test/clf/<modality> as the trained module's."""
    module = MethodModule(_model(data), build_method("cggm"), data.task, lr=1e-2)
    trainer = _fit(module, data, _trainer(tmp_path, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = trainer.test(module, dataloader(data.test, 16), verbose=False)[0]
        fresh = MethodModule(_model(data, seed=5), build_method("cggm"), data.task)
        got = _trainer(tmp_path / "eval", 1).test(fresh, dataloader(data.test, 16), verbose=False,
                                                   ckpt_path=str(tmp_path / "epoch=1.ckpt"))[0]
    assert {"test/accuracy", "test/clf/strong", "test/clf/weak"} <= set(expected)
    assert expected == got
    for k, v in module.method.classifiers.state_dict().items():
        assert torch.equal(fresh.method.classifiers.state_dict()[k], v), k


def test_a_step_lightning_skips_is_seen_by_the_method(data, tmp_path):
    """method.step(LightningOptimizer): a precision plugin that skips the wrapped optimizer's step
    (as a scaler does on inf) leaves the method uncommitted for that step."""
    from lightning.pytorch.plugins.precision import Precision

    class SkipOddSteps(Precision):
        calls = 0

        def optimizer_step(self, optimizer, model, closure, **kwargs):
            self.calls += 1
            if self.calls % 2:
                return closure()
            return super().optimizer_step(optimizer, model, closure, **kwargs)

    module = MethodModule(_model(data), build_method("cggm"), data.task, lr=1e-2)
    trainer = _fit(module, data, _trainer(tmp_path, 2, num_sanity_val_steps=0, plugins=[SkipOddSteps()]))
    assert trainer.global_step == 8 and module.method.global_step == 4
    assert module.method.classifier_opt.state_dict()["state"][0]["step"] == 4  # classifiers stepped 4 times


def test_predict_step_gives_the_methods_own_prediction(data, tmp_path):
    """ume predicts with its own heads (the mean of their logits), not the model's fused head: predict_step
    returns that, recomputed here from the heads and the features."""
    module = MethodModule(_model(data), build_method("ume"), data.task, lr=1e-2)
    trainer = _fit(module, data, _trainer(tmp_path, 1, num_sanity_val_steps=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torch.cat(trainer.predict(module, dataloader(data.test, 16)))
    model, heads = module.model.eval(), module.method.heads.modules.eval()
    inputs, masks, _ = data.test.get_batch(torch.arange(len(data.test)))
    with torch.no_grad():
        out = model(inputs, masks)
        want = sum(head(h, out.mask(i)) for i, (head, h) in enumerate(zip(heads, out.features))) / len(heads)
        assert not torch.allclose(want, out.prediction)
    torch.testing.assert_close(got, want)
