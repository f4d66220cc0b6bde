"""Methods by name, used only at the edges (CLI, configs, benchmarks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

METHODS: dict[str, Callable[..., Any]] = {}


def register_method(name: str, factory: Callable[..., Any] | None = None):
    """Register a method class (as a decorator) or a factory function under ``name``."""

    def deco(obj):
        if name in METHODS:
            raise ValueError(f"Method {name!r} is registered twice.")
        METHODS[name] = obj
        return obj

    return deco(factory) if factory is not None else deco


def build_method(name: str, **options: Any):
    """Build a registered method; unknown names and options give a clear error."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}. Known methods: {', '.join(sorted(METHODS))}.")
    try:
        return METHODS[name](**options)
    except TypeError as err:
        raise TypeError(f"Bad options for method {name!r}: {err}") from err


def list_methods() -> list[str]:
    return sorted(METHODS)
