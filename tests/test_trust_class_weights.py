"""Class-weight tensors are built once per (device, dtype): a loss call makes no host-to-device copy,
and the Task itself (equality, hashing, pickling) does not change."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch.nn import functional as F

from cggm.types import Task


# -- class weights: built once per (device, dtype) -------------------------------------------------
def test_class_weights_are_built_once_per_device_and_dtype():
    task = Task("classification", 3, class_weights=[1, 2, 4])
    pred = torch.randn(5, 3, requires_grad=True)
    target = torch.tensor([0, 1, 2, 2, 1])
    w = task._weights(pred)
    assert task._weights(pred) is w  # no new tensor (no host-to-device copy) per loss call
    assert torch.equal(w, torch.tensor([1.0, 2.0, 4.0]))
    task.loss(pred, target)
    assert task._weights(pred) is w and torch.equal(w, torch.tensor([1.0, 2.0, 4.0]))
    manual = F.cross_entropy(pred, target, weight=torch.tensor([1.0, 2.0, 4.0]))
    assert torch.allclose(task.loss(pred, target), manual)
    # it follows the prediction's dtype and device
    w64 = task._weights(pred.double())
    assert w64.dtype == torch.float64 and task._weights(pred.double()) is w64
    assert task._weights(torch.empty(2, 3, device="meta")).device.type == "meta"
    # the task itself is unchanged: equality, hashing and pickling see no cache
    same = Task("classification", 3, class_weights=(1.0, 2.0, 4.0))
    assert same == task and hash(same) == hash(task)
    again = pickle.loads(pickle.dumps(task))
    assert again == task and again._weights(pred) is w


def test_class_weights_first_built_under_inference_mode_still_train():
    task = Task("classification", 2, class_weights=(0.3, 0.7))
    pred = torch.randn(4, 2, requires_grad=True)
    target = torch.tensor([0, 1, 1, 0])
    with torch.inference_mode():
        task.loss(pred.detach(), target)
    task.loss(pred, target).backward()  # an inference tensor could not be saved for backward
    assert pred.grad is not None


def test_class_weights_must_match_the_classes():
    with pytest.raises(ValueError, match="class_weights has 2 values for 3 outputs"):
        Task("classification", 3, class_weights=(1.0, 2.0))
