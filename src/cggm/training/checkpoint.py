"""Atomic checkpoints that are refused with a clear message when corrupt or incompatible."""

from __future__ import annotations

import errno
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
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # a full disk: OSError(ENOSPC) or torch's RuntimeError
        _remove(tmp)
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)
        why = "no space left on device" if full else text
        kept = (f"the previous {path.name} is intact" if path.is_file() else f"there was no previous {path.name}")
        raise CheckpointError(f"Could not write the checkpoint {path} ({why}); {kept}. "
                              + ("Free some disk space, then rerun the same command to resume from it."
                                 if full and path.is_file() else "")) from err
    except BaseException:  # Ctrl-C while writing: the previous checkpoint stays as it was
        _remove(tmp)
        raise


def _remove(tmp: str | None) -> None:
    if tmp is not None and os.path.exists(tmp):
        os.unlink(tmp)


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
