"""The progress bar handed to every suite: ``add(n)`` points to come, ``advance(text)`` one done.

Rich's bar when rich is installed and stderr is a terminal, else one plain line per point on
stderr (readable in CI logs); ``Progress(enabled=False)`` shows nothing (tests). It also keeps
every record the runner reports (``records``), so that an interrupted run can still write what it
measured.
"""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.total = 0
        self.done = 0
        self.records: list = []
        self._start = time.monotonic()
        self._bar = None
        self._task = None
        if enabled and sys.stderr.isatty():
            try:
                from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
                from rich.progress import Progress as RichProgress
            except ImportError:
                return
            self._bar = RichProgress(
                TextColumn("{task.description}", markup=False),  # "sdpa[flash]" is not markup
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                transient=False,
            )
            self._task = self._bar.add_task("benchmarks", total=0)

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def add(self, n: int) -> None:
        """``n`` more points are coming."""
        self.total += n
        if self._bar is not None:
            self._bar.update(self._task, total=self.total)

    def advance(self, text: str, record=None) -> None:
        """One point is done; ``text`` says which and how it went."""
        self.done += 1
        if record is not None:
            self.records.append(record)
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=text)
        elif self.enabled:
            elapsed = time.monotonic() - self._start
            print(f"[{self.done}/{self.total} {elapsed:6.0f}s] {text}", file=sys.stderr, flush=True)
