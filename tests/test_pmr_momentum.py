"""PMR's prototypes over two epochs (issue 17: no test ran a second epoch). At each epoch start
the prototypes are the class means of each modality's features over the training split, smoothed
with momentum: c <- mu c_old + (1 - mu) c_new. The reference recomputes the class means in numpy
from copies of the model taken at each epoch start (eval mode), and applies the momentum by hand."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cggm.methods.base import EpochContext
from cggm.methods.pmr import PMR
from cggm.models.factory import build_model
from cggm.training.step import train_step
from cggm.types import Task

TASK = Task("classification", 3)
MU = 0.7


def _class_means(model, batches) -> list[np.ndarray]:
    """[C, D] per modality: the mean feature of each class over all batches, in float64 numpy."""
    model = copy.deepcopy(model).eval()
    feats, ys = [[], []], []
    with torch.no_grad():
        for inputs, masks, y in batches:
            for i, h in enumerate(model(inputs, masks).features):
                feats[i].append(h.double().numpy())
            ys.append(y.numpy())
    y = np.concatenate(ys)
    return [np.stack([np.concatenate(f)[y == k].mean(0) for k in range(TASK.num_outputs)]) for f in feats]


def test_prototypes_carry_momentum_into_the_second_epoch():
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        y = torch.arange(12) % 3
        batches.append(({"a": torch.randn(12, 6, generator=g) + y[:, None], "b": torch.randn(12, 4, generator=g)},
                        {}, y))
    torch.manual_seed(0)
    model = build_model("mlp", {"a": (6,), "b": (4,)}, TASK, feature_dim=8, hidden=16, head_hidden=16)
    method = PMR(alpha=0.6, momentum=MU).bind(model, TASK, ("a", "b"))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    method.set_optimizer(opt)

    first = _class_means(model, batches)
    method.begin_epoch(EpochContext.from_loaders(model, TASK, 0, 2, train=batches))
    for c, ref in zip(method.prototypes, first):  # epoch 0: no old prototypes, the class means
        np.testing.assert_allclose(c.double().numpy(), ref, rtol=1e-5, atol=1e-6)
    for batch in batches:
        assert train_step(method, opt, batch).taken

    second = _class_means(model, batches)
    assert max(float(np.abs(a - b).max()) for a, b in zip(first, second)) > 1e-2  # the features moved
    method.begin_epoch(EpochContext.from_loaders(model, TASK, 1, 2, train=batches))
    for c, old, new in zip(method.prototypes, first, second):
        ref = MU * old + (1 - MU) * new
        assert float(np.abs(ref - new).max()) > 1e-3  # momentum matters on these inputs
        np.testing.assert_allclose(c.double().numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.0])
def test_zero_momentum_takes_the_new_class_means(momentum):
    """The other end of the formula: mu = 0 keeps nothing of the old prototypes."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(12) % 3
    batches = [({"a": torch.randn(12, 6, generator=g), "b": torch.randn(12, 4, generator=g)}, {}, y)]
    torch.manual_seed(0)
    model = build_model("mlp", {"a": (6,), "b": (4,)}, TASK, feature_dim=8, hidden=16, head_hidden=16)
    method = PMR(momentum=momentum).bind(model, TASK, ("a", "b"))
    method.prototypes = [torch.full((3, 8), 5.0), torch.full((3, 8), -5.0)]
    method.begin_epoch(EpochContext.from_loaders(model, TASK, 1, 2, train=batches))
    for c, ref in zip(method.prototypes, _class_means(model, batches)):
        np.testing.assert_allclose(c.double().numpy(), ref, rtol=1e-5, atol=1e-6)
