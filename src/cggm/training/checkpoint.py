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
    changes = settings_changes(state.get("fingerprint", {}), expect or {})
    if changes:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise CheckpointError(
            f"Checkpoint {path} is incompatible with this run: its settings differ ({shown}). "
            f"A run resumes only with the settings it started with (train.epochs may grow; progress and "
            f"logging settings may change). To start fresh, use --no-resume (replaces that run) or a new --output."
        )
    return state


# names of fingerprint keys as a config names them
_LABELS = {"method": "method.name", "dataset": "dataset.name", "arch": "model.arch"}


def settings_changes(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """``"name: old -> new"`` for each setting of ``want`` that differs from the checkpoint's
    fingerprint ``have``; a mapping is compared key by key (``train.lr: 0.001 -> 0.01``)."""
    out = []
    for key, new in want.items():
        old = have.get(key, _ABSENT)
        label = _LABELS.get(key, key)
        if isinstance(old, dict) and isinstance(new, dict):
            for sub in sorted(set(old) | set(new), key=str):
                a, b = old.get(sub, _ABSENT), new.get(sub, _ABSENT)
                if not _same(a, b):
                    out.append(f"{label}.{sub}: {_show(a)} -> {_show(b)}")
        elif old is _ABSENT:  # written before this setting was recorded
            out.append(f"{label}: (not recorded in the checkpoint) -> {_show(new)}")
        elif not _same(old, new):
            out.append(f"{label}: {_show(old)} -> {_show(new)}")
    return out


class _Absent:
    def __repr__(self) -> str:
        return "(not set)"


_ABSENT = _Absent()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):  # a YAML list is a tuple default
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:
        return False


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)
