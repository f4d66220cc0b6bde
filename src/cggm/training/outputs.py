"""The files a run writes next to its checkpoints, as it goes (rank 0 only).

``metrics.jsonl``
    one JSON object per epoch (``epoch``, ``train_loss``, ``lr``, ``seconds``, ``val/<metric>``;
    a NaN or infinite value is ``null``), appended and flushed at each epoch end, so ``tail -f`` or a notebook can follow a run. On a
    resume it is rewritten from the checkpoint's history first, so an epoch that is trained again
    never appears twice.
``history.json``
    the same rows as one JSON list, rewritten at each epoch end.
``records.json``
    each method's per-step records (``B/<modality>``, ``eps/<modality>``, ``L_gm``, ...): one list
    of floats per name, written when the run ends.
``tensorboard/``
    with ``train.tensorboard: true`` (the ``tensorboard`` extra): the epoch rows as scalars (step =
    epoch number) and the per-step records (step = their index), written at each epoch end.

JSON files are written atomically (a temporary file renamed over the target).

A run that starts over in a folder holding another run's files (``resume=False``, ``cggm train
--no-resume``) first moves them into ``previous-<UTC time>/`` there (:func:`set_aside_run`), so a
folder never mixes two runs (and nothing of the earlier one is lost).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .._optional import require


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (NaN and inf as JSON's ``NaN``/``Infinity``)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=float)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


#: what a run writes in its output folder (the engine, ``cggm train``'s config.yaml and ``cggm plot``'s figures)
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "history.json", "records.json", "result.json", "config.yaml",
             "tensorboard", "records_*.png")


def set_aside_run(output_dir: str | Path) -> tuple[Path, list[str]] | None:
    """Move the files of the run in ``output_dir`` (:data:`RUN_FILES`; other files stay) into a new
    folder ``output_dir/previous-<UTC time>/``; returns that folder and the names moved, or ``None``
    when there was nothing to move."""
    output_dir = Path(output_dir)
    found = sorted({p for pattern in RUN_FILES for p in output_dir.glob(pattern)}) if output_dir.is_dir() else []
    if not found:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest, n = output_dir / f"previous-{stamp}", 1
    while dest.exists():
        n += 1
        dest = output_dir / f"previous-{stamp}-{n}"
    dest.mkdir()
    for p in found:
        os.replace(p, dest / p.name)
    return dest, [p.name for p in found]


def require_tensorboard() -> None:
    """Raise :class:`~cggm._optional.MissingDependencyError` now if TensorBoard is not installed."""
    require("tensorboard", "tensorboard", "TensorBoard logging (train.tensorboard)")


class RunFiles:
    def __init__(self, output_dir: Path | None, tensorboard: bool = False):
        self.dir = output_dir
        self.tensorboard = tensorboard and output_dir is not None
        self._writer = None

    def begin(self, history: list[dict[str, Any]]) -> None:
        """Start (or resume) writing: ``metrics.jsonl`` and ``history.json`` hold ``history``."""
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "metrics.jsonl", "w") as f:
            for row in history:
                f.write(_line(row))
        write_json(self.dir / "history.json", history)
        if self.tensorboard:
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.dir / "tensorboard"))

    def epoch_end(self, row: dict[str, Any], history: list[dict[str, Any]], records: dict[str, list[float]],
                  logged: dict[str, int]) -> None:
        """After epoch ``row["epoch"]``'s checkpoint: one more line, the history, and TensorBoard
        scalars (the records past ``logged[name]`` values of each name)."""
        if self.dir is None:
            return
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(_line(row))
            f.flush()
        write_json(self.dir / "history.json", history)
        if self._writer is not None:
            step = int(row["epoch"]) + 1
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
            for name, values in records.items():
                for i in range(logged.get(name, 0), len(values)):
                    self._writer.add_scalar(name, values[i], i + 1)
            self._writer.flush()

    def end(self, history: list[dict[str, Any]], records: dict[str, list[float]]) -> None:
        if self.dir is None:
            return
        write_json(self.dir / "history.json", history)
        write_json(self.dir / "records.json", records)
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _line(row: dict[str, Any]) -> str:
    return json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()},
                      default=float) + "\n"
