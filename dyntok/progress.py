"""Progress bars that stay readable in a log file.

On a terminal this is tqdm. When stderr is not a terminal (a batch job's log, ``nohup``, a pipe), tqdm's
carriage-return redraws pile up into one unreadable line per refresh; there a plain line is printed instead
at every tenth of the way, with the rate and the time left, at most one a minute; work that ends within its
first minute prints nothing, so quick steps (decoding a small split, a short evaluation) leave no noise.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable

from tqdm.auto import tqdm

__all__ = ["progress_bar", "LineProgress"]

#: Share of the total between two lines of a non-terminal log, and the least time between two lines.
LINE_EVERY = 0.1
MIN_SECONDS = 60.0


def progress_bar(iterable: Iterable | None = None, *, disable: bool = False, **options: Any):
    """``tqdm(iterable, **options)`` on a terminal; a :class:`LineProgress` when stderr is redirected."""
    if disable or sys.stderr.isatty():
        return tqdm(iterable, disable=disable, **options)
    return LineProgress(iterable, total=options.get("total"), desc=options.get("desc", ""),
                        unit=options.get("unit", "it"))


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LineProgress:
    """The part of tqdm's interface dyntok uses, printing one plain line per ``LINE_EVERY`` of the total."""

    def __init__(self, iterable: Iterable | None = None, total: float | None = None, desc: str = "",
                 unit: str = "it", file=None, min_seconds: float = MIN_SECONDS):
        self.iterable = iterable
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.file = file or sys.stderr
        self.postfix = ""
        self._start = self._last_line = time.perf_counter()
        self._next_line = LINE_EVERY
        self.min_seconds, self.lines, self._last_n = min_seconds, 0, 0

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.total and self.n / self.total >= self._next_line - 1e-9:
            while self._next_line <= self.n / self.total + 1e-9:
                self._next_line += LINE_EVERY
            if time.perf_counter() - self._last_line >= self.min_seconds:
                self._print()

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def set_description_str(self, desc: str) -> None:
        self.desc = desc

    def refresh(self) -> None:
        """Nothing to redraw: lines are printed as the work advances."""

    def close(self) -> None:
        """A final line for work long enough to have printed one, unless the last already said it all."""
        if self.lines and self._last_n != self.n:
            self._print()

    def _print(self) -> None:
        elapsed = time.perf_counter() - self._start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        line = f"{self.desc}: {self.n:g}/{self.total:g} {self.unit} ({100 * self.n / self.total:.0f}%), " \
               f"{rate:.3g} {self.unit}/s, {_clock(elapsed)} elapsed"
        if rate > 0:
            line += f", {_clock((self.total - self.n) / rate)} left"
        if self.postfix:
            line += f", {self.postfix}"
        print(line, file=self.file, flush=True)
        self._last_line, self._last_n, self.lines = time.perf_counter(), self.n, self.lines + 1
