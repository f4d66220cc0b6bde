"""Datasets by name, used at the edges (CLI, configs, benchmarks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import DataSplits

DATASETS: dict[str, Callable[..., DataSplits]] = {}


def register_dataset(name: str):
    def deco(fn: Callable[..., DataSplits]):
        if name in DATASETS:
            raise ValueError(f"Dataset {name!r} is registered twice.")
        DATASETS[name] = fn
        return fn

    return deco


def load_dataset(name: str, **options: Any) -> DataSplits:
    """Load a registered dataset; unknown names and options give a clear error."""
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}. Known datasets: {', '.join(sorted(DATASETS))}.")
    try:
        return DATASETS[name](**options)
    except TypeError as err:
        raise TypeError(f"Bad options for dataset {name!r}: {err}") from err


def list_datasets() -> list[str]:
    return sorted(DATASETS)
