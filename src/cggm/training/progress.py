"""Training progress on stderr, whatever stderr is.

* a terminal: a ``tqdm`` bar per epoch (the ``cli`` extra installs tqdm), or a plain ``\\r`` bar
  without it;
* a file or a pipe (a batch job's log, ``nohup``, CI): a plain line every ``interval`` seconds
  (``train.log_interval``, default 30; 0 = every step), so a long epoch is never silent.

The loss is read from the device only when something is printed (a host synchronisation).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _tqdm():
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class Progress:
    def __init__(self, epochs: int, interval: float = 30.0, stream: TextIO | None = None, enabled: bool = True,
                 use_tqdm: bool = True):
        self.epochs, self.interval, self.enabled = epochs, float(interval), enabled
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self._tqdm = _tqdm() if (use_tqdm and self.terminal) else None
        self._bar: Any = None
        self._epoch, self._total, self._t0, self._last = 0, 0, 0.0, 0.0

    def start_epoch(self, epoch: int, total: int, done: int = 0) -> None:
        if not self.enabled:
            return
        self._epoch, self._total = epoch, total
        self._t0 = self._last = time.monotonic()
        if self._tqdm is not None:
            self._bar = self._tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{self.epochs}",
                                   file=self.stream, leave=False, dynamic_ncols=True, unit="step")

    def step(self, done: int, loss: Any = None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
            if loss is not None and now - self._last >= 0.5:
                self._bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
                self._last = now
            return
        loss_txt = lambda: "" if loss is None else f" loss {float(loss):.4f}"  # noqa: E731  (a sync: only to print)
        if self.terminal:  # no tqdm: a plain bar redrawn in place
            if now - self._last < 0.1 and done < self._total:
                return
            self._last = now
            width = 24
            filled = int(width * done / max(self._total, 1))
            end = "" if done < self._total else "\n"
            print(f"\repoch {self._epoch + 1}/{self.epochs} [{'#' * filled}{'.' * (width - filled)}] "
                  f"{done}/{self._total}{loss_txt()}", end=end, file=self.stream, flush=True)
            return
        if now - self._last >= self.interval and done < self._total:
            self._last = now
            print(f"epoch {self._epoch + 1}/{self.epochs} step {done}/{self._total}{loss_txt()} "
                  f"({now - self._t0:.0f} s into the epoch)", file=self.stream, flush=True)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
