"""Issue 17 item 7: MethodModule under fp16 (Lightning's 16-mixed plugin with a CPU GradScaler) with
gradient_clip_val, and with two validation loaders.

* An ordinary scaler overflow (init_scale 2**20: the first steps' fp16 gradients are inf) is skipped
  by the scaler, which halves its scale; training goes on (before: NonFiniteError on the first one).
* on_nonfinite="skip" with a non-finite loss under clipping: the next step does not raise from
  unscale_ (before: "unscale_() has already been called on this optimizer since the last update()").
* Two validation loaders are scored apart: loader 1 as val/<name>/dataloader_idx_1, and the
  method's epoch-end hook sees loader 0's metrics only (before: one pooled val/accuracy).
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("lightning", reason="the Lightning integration needs the 'lightning' extra: "
                                        "pip install -e '.[lightning]'")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

from cggm.data import load_dataset  # noqa: E402
from cggm.integrations.lightning import MethodModule, dataloader  # noqa: E402
from cggm.methods import build_method  # noqa: E402
from cggm.models import build_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
INIT = 2.0 ** 20


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", dim=8, n_train=64, n_val=16, n_test=16)


def _model(data):
    torch.manual_seed(0)
    return build_model("mlp", data.input_shapes, data.task, feature_dim=8, hidden=16, head_hidden=16)


def _trainer(root, epochs, **kwargs):
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
                      num_sanity_val_steps=0, **kwargs)


def _fit(module, trainer, train, val):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train, val)
    return trainer


class _NaNBatch(torch.utils.data.Dataset):
    """The dataset with NaN inputs for the samples in ``bad`` (a non-finite loss on their batch)."""

    def __init__(self, dataset, bad):
        self.dataset, self.bad = dataset, set(bad)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        inputs, masks, target = self.dataset[i]
        if i in self.bad:
            inputs = {k: torch.full_like(v, float("nan")) for k, v in inputs.items()}
        return inputs, masks, target


@pytest.mark.parametrize("name", ["joint", "ume"])  # ume: auxiliary heads stepped through the scaler too
def test_scaler_overflow_with_clipping_is_skipped_and_training_goes_on(data, tmp_path, name):
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT, growth_interval=10_000)
    module = MethodModule(_model(data), build_method(name), data.task, lr=1e-2, gradient_clip_val=1.0)
    before = [p.detach().clone() for p in module.model.parameters()]
    trainer = _fit(module, _trainer(tmp_path, 2, plugins=[MixedPrecision("16-mixed", "cpu", scaler)]),
                   dataloader(data.train, 16), dataloader(data.val, 16))
    taken = module.method.global_step
    assert trainer.global_step == 8 and trainer.current_epoch == 2  # both epochs ran to their end
    assert 0 < taken < 8  # some steps overflowed (skipped by the scaler), later ones were taken
    assert module.skipped_steps == 0  # an overflow is not divergence
    # halved at least once per overflowing model step (also when only an auxiliary head overflowed), never grown
    assert scaler.get_scale() <= INIT * 0.5 ** (8 - taken)
    params = list(module.model.parameters())
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


@pytest.mark.parametrize("name", ["joint", "ume"])
def test_nonfinite_loss_skipped_under_fp16_clipping_does_not_break_the_next_step(data, tmp_path, name):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=10_000)
    module = MethodModule(_model(data), build_method(name), data.task, lr=1e-2, gradient_clip_val=1.0,
                          on_nonfinite="skip")
    train = dataloader(_NaNBatch(data.train, range(16, 32)), 16)  # batch 1 of each epoch: NaN loss
    trainer = _fit(module, _trainer(tmp_path, 2, plugins=[MixedPrecision("16-mixed", "cpu", scaler)]),
                   train, dataloader(data.val, 16))
    assert trainer.current_epoch == 2
    assert module.skipped_steps == 2  # the two NaN batches; the steps after them ran
    taken = module.method.global_step
    assert taken == 6  # (no overflow at scale 2**8 on the finite batches)
    assert scaler.get_scale() == 2.0 ** 8 * 0.5 ** 2  # each NaN step closed the scaler's step (inf found)
    assert all(torch.isfinite(p).all() for p in module.model.parameters())


def _accuracy(model, loader):
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for inputs, masks, target in loader:
            correct += int((model(inputs, masks).prediction.argmax(1) == target).sum())
            total += int(target.shape[0])
    return correct / total


def test_two_validation_loaders_are_scored_apart(data, tmp_path):
    method = build_method("joint")  # scored by the model's prediction, as _accuracy does
    seen = []
    hook = method.on_epoch_end
    method.on_epoch_end = lambda ctx: (seen.append(dict(ctx.metrics)), hook(ctx))[1]
    module = MethodModule(_model(data), method, data.task, lr=1e-2)
    val, other = dataloader(data.val, 16), dataloader(data.train, 16)  # other: 64 samples, 4x the val's weight
    trainer = _fit(module, _trainer(tmp_path, 2), dataloader(data.train, 16, shuffle=True), [val, other])
    metrics = trainer.callback_metrics
    acc_val, acc_other = _accuracy(module.model, val), _accuracy(module.model, other)  # the final model's
    assert abs(acc_val - acc_other) > 0.05  # the test can tell them apart
    assert float(metrics["val/accuracy"]) == pytest.approx(acc_val, abs=1e-6)
    assert float(metrics["val/accuracy/dataloader_idx_1"]) == pytest.approx(acc_other, abs=1e-6)
    assert len(seen) == 2 and seen[-1]["accuracy"] == pytest.approx(acc_val, abs=1e-6)


class _Count:
    """A method's own evaluation metric: the number of samples scored."""

    def __init__(self):
        self.n = 0

    def update(self, out, target):
        self.n += int(target.shape[0])

    def compute(self):
        return float(self.n)

    def reset(self):
        self.n = 0


def test_two_validation_loaders_keep_the_methods_own_metrics_apart(data, tmp_path):
    """A method that hands out the same metric object each time (as CGGM's clf metric does)."""
    from cggm.methods.base import Method

    class Counting(Method):
        name = "counting"

        def __init__(self):
            super().__init__()
            self.metric = _Count()

        def eval_metrics(self):
            return {"n": self.metric}

    module = MethodModule(_model(data), Counting(), data.task, lr=1e-2)
    trainer = _fit(module, _trainer(tmp_path, 1), dataloader(data.train, 16),
                   [dataloader(data.val, 16), dataloader(data.train, 16)])
    assert float(trainer.callback_metrics["val/n"]) == len(data.val) == 16
    assert float(trainer.callback_metrics["val/n/dataloader_idx_1"]) == len(data.train) == 64
