"""Tiny data, models and a one-step driver shared by the method tests."""

from __future__ import annotations

import torch

from cggm.data import load_dataset
from cggm.methods import EpochContext
from cggm.models import build_model

_DATA: dict = {}


def tiny_data(M: int = 2):
    if M not in _DATA:
        _DATA[M] = load_dataset("synthetic", num_modalities=M, n_train=64, n_val=32, n_test=32)
    return _DATA[M]


def tiny_model(data, seed: int = 0):
    torch.manual_seed(seed)
    return build_model("mlp", data.input_shapes, data.task, feature_dim=8, hidden=16, head_hidden=16)


def batch(data, split: str = "train", start: int = 0, size: int = 32):
    ds = getattr(data, split)
    return ds.get_batch(torch.arange(start, start + size))


def train_step(model, method, optimizer, inputs, masks, target):
    """The public step: prepare -> model -> loss -> backward -> step."""
    inputs, masks = method.prepare(inputs, masks)
    out = model(inputs, masks)
    loss = method.loss(out, target, method.task.loss(out.prediction, target))
    optimizer.zero_grad(set_to_none=True)
    method.backward(loss)
    method.step(optimizer)
    return loss


def make_optimizer(model, method, lr: float = 1e-2, kind: str = "adam"):
    groups = method.param_groups(model)
    for g in groups:
        g["lr"] = lr * float(g.pop("lr_scale", 1.0))
    opt = torch.optim.SGD(groups, lr=lr) if kind == "sgd" else torch.optim.Adam(groups, lr=lr)
    method.set_optimizer(opt)
    return opt


def context(data, model, epoch: int = 0, epochs: int = 3, batch_size: int = 32) -> EpochContext:
    def batches(split):
        ds = getattr(data, split)
        for s in range(0, len(ds), batch_size):
            yield ds.get_batch(torch.arange(s, min(s + batch_size, len(ds))))

    return EpochContext(epoch=epoch, epochs=epochs, model=model, task=data.task, batches=batches, forward=model)
