"""Optional dependencies: import them lazily and fail with one clear message when missing."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingDependencyError(ImportError):
    """Raised when a feature needs a package that is not installed."""


def require(module: str, extra: str, feature: str | None = None) -> ModuleType:
    """Import ``module`` or raise a :class:`MissingDependencyError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:  # pragma: no cover - exercised through the error message tests
        what = feature or module
        raise MissingDependencyError(
            f"{what} needs the optional package '{module.split('.')[0]}', which is not installed. "
            f"Install it with: pip install 'cggm[{extra}]'"
        ) from err
