"""Progress of a long stage (warm-up, labelling, reward-model training, RL steps, evaluation), with an ETA.

On a terminal it is a tqdm bar on stderr showing the latest figures (reward, accuracy, KL, length for RL). Where
stderr is not a terminal (CI, a log file, a test) a bar would fill the log with carriage returns, so a plain line
goes to ``log`` instead, at each tenth of the way and at least every ``interval_s`` seconds, and at the end.

    with Progress(total=60, what="RL", unit="step", log=print) as progress:
        for step in range(60):
            ...
            progress.update(reward=0.41, acc=0.52)
"""
from __future__ import annotations

import sys
import time
from typing import Callable


def format_seconds(seconds: float) -> str:
    """12 s, 3.5 min, 1.2 h: what a reader wants from an ETA."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _figure(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """``update(n, **figures)`` after each unit of work; ``close()`` (or leaving the ``with`` block) at the end.

    ``bar``: True for a tqdm bar, False for plain lines, None (default) for a bar exactly when stderr is a terminal.
    ``line``: makes the plain line from (done, total, figures); by default ``what done/total name value ...``.
    """

    def __init__(self, total: int, what: str, unit: str = "it", log: Callable[[str], None] = print,
                 bar: bool | None = None, line: Callable[[int, int, dict], str] | None = None,
                 interval_s: float = 60.0):
        self.total, self.what, self.log = max(0, int(total)), what, log
        self.line = line or self._default_line
        self.interval_s = interval_s
        self.done = 0
        self.figures: dict = {}
        self._start = self._last_line = time.perf_counter()
        self._last_tenth = 0
        self._closed = False
        self._bar = None
        if bar if bar is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=what, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, **figures) -> None:
        self.done += n
        self.figures.update(figures)
        if self._bar is not None:
            if figures:
                self._bar.set_postfix({k: _figure(v) for k, v in figures.items()}, refresh=False)
            self._bar.update(n)
            return
        tenth = self.done * 10 // self.total if self.total else 10
        now = time.perf_counter()
        if self.done >= self.total or tenth > self._last_tenth or now - self._last_line >= self.interval_s:
            self._last_tenth, self._last_line = tenth, now
            self.log(f"{self.line(self.done, self.total, self.figures)}  {self.timing()}")

    def timing(self) -> str:
        """Elapsed time and, while unfinished, the ETA at the average pace so far."""
        elapsed = time.perf_counter() - self._start
        if self.done >= self.total or not self.done:
            return f"({format_seconds(elapsed)})"
        eta = elapsed / self.done * (self.total - self.done)
        return f"({format_seconds(elapsed)}, ETA {format_seconds(eta)})"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()

    def _default_line(self, done: int, total: int, figures: dict) -> str:
        shown = "".join(f"  {name} {_figure(value)}" for name, value in figures.items())
        return f"{self.what} {done}/{total}{shown}"
