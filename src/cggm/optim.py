"""The one optimizer builder: the engine, the Lightning module, a user's own loop and the methods'
own modules (auxiliary heads, classifiers) all build optimizers here."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

OPTIMIZERS = ("adam", "adamw", "sgd")


def build_optimizer(name: str, params: Iterable[Any], lr: float, *, weight_decay: float = 0.0, momentum: float = 0.9,
                    fused: bool = False) -> torch.optim.Optimizer:
    """``name`` (``"adam"``, ``"adamw"`` or ``"sgd"``) over ``params``: parameters, or parameter
    groups (dicts) whose optional ``lr_scale`` multiplies ``lr`` for that group (the groups of
    :meth:`cggm.methods.Method.param_groups`). ``momentum`` is SGD's. ``fused``: one fused kernel
    where the device supports it, else foreach (the methods' small auxiliary modules)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}.")
    params = list(params)
    groups = []
    for g in params:
        if isinstance(g, dict):
            g = dict(g)
            g["lr"] = lr * float(g.pop("lr_scale", 1.0))
        groups.append(g)
    if name == "sgd":
        cls, kwargs = torch.optim.SGD, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
    else:
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        kwargs = {"lr": lr, "weight_decay": weight_decay}
    if not fused:
        return cls(groups, **kwargs)
    try:
        return cls(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return cls(groups, foreach=True, **kwargs)
