"""A test helper: two (nested) method or optimizer states are bitwise the same."""

from __future__ import annotations

import torch


def assert_same_state(a, b, where="state"):
    """Tensors equal in shape and value, dicts with the same keys, sequences of the same length,
    other values equal (NaN equals NaN: a state that holds NaN is unchanged if it still does)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), (where, a, b)
