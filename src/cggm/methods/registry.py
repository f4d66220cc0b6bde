"""Methods by name, used only at the edges (CLI, configs, benchmarks)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

METHODS: dict[str, Callable[..., Any]] = {}
INFO: dict[str, MethodInfo] = {}


@dataclass(frozen=True)
class MethodInfo:
    """What ``cggm methods`` and the documentation show of a registered method: ``summary`` (one
    line: the class docstring's first paragraph unless given), ``source`` (paper and code: the class's
    ``source`` unless given) and the method class (its ``support`` says what it requires)."""

    name: str
    summary: str
    source: str
    cls: type


def register_method(name: str, factory: Callable[..., Any] | None = None, *, summary: str | None = None,
                    source: str | None = None):
    """Register a method class (as a decorator) or a factory function under ``name``; a factory
    (a ``functools.partial`` of a class, or a classmethod) takes the class's source unless given."""

    def deco(obj):
        if name in METHODS:
            raise ValueError(f"Method {name!r} is registered twice.")
        cls = _method_class(obj)
        doc = inspect.getdoc(obj) if isinstance(obj, type) else None
        METHODS[name] = obj
        INFO[name] = MethodInfo(name, summary or _first_paragraph(doc or inspect.getdoc(cls) or ""),
                                source or getattr(cls, "source", ""), cls)
        return obj

    return deco(factory) if factory is not None else deco


def _first_paragraph(doc: str) -> str:
    """The docstring's first paragraph on one line (a summary may wrap), Sphinx roles as plain names."""
    first = " ".join(doc.split("\n\n")[0].split())
    return re.sub(r":(?:class|func|meth|mod|attr):`~?([^`]+)`", lambda m: m.group(1).split(".")[-1], first)


def _method_class(obj: Any) -> type:
    if isinstance(obj, type):
        return obj
    inner = getattr(obj, "func", None) or getattr(obj, "__self__", None)
    if isinstance(inner, type):
        return inner
    raise TypeError(f"register_method needs a Method class, a functools.partial of one or a classmethod of one, "
                    f"got {obj!r}.")


def method_info(name: str) -> MethodInfo:
    if name not in INFO:
        raise ValueError(f"Unknown method {name!r}. Known methods: {', '.join(sorted(METHODS))}.")
    return INFO[name]


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
