"""Atomic checkpoints that are refused with a clear message when corrupt or incompatible."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "cggm-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, truncated, or from an incompatible run)."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, flushed to
    disk, then renamed over the target. A crash while writing leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    ``expect`` maps keys of the checkpoint's ``fingerprint`` to the values this run requires
    (method, model architecture, modalities...); a mismatch is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {path}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated, not a torch file, ...
        raise CheckpointError(
            f"Checkpoint {path} is corrupt or not a cggm checkpoint ({type(err).__name__}: {err}). "
            f"Delete it or point --resume at another file."
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file (format={getattr(state, 'get', lambda k: None)('format')!r}).")
    fingerprint = state.get("fingerprint", {})
    for key, want in (expect or {}).items():
        have = fingerprint.get(key)
        if have != want:
            raise CheckpointError(
                f"Checkpoint {path} is incompatible with this run: {key} is {have!r} there and {want!r} here. "
                f"Use a new output directory, or the same settings as the checkpointed run."
            )
    return state
