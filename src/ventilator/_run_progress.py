"""The progress bar of `map` and `exec`: lines done of lines read, on stderr."""

from __future__ import annotations

import sys
import time
from typing import Any

# How often the progress bar is redrawn at most.
PROGRESS_REFRESH_S = 0.1


class Progress:
    """A rich progress bar on stderr when it is a terminal; silent otherwise.

    The total is what was read so far (input is streamed, and read ahead of
    the results), so the ETA covers the lines known yet; it is exact once the
    input has ended. The bar is redrawn at most every PROGRESS_REFRESH_S, not
    per line: lines finish by the thousand per second.
    """

    def __init__(self, wanted: bool | None) -> None:
        self._enabled = sys.stderr.isatty() if wanted is None else wanted
        self._progress: Any = None
        self._task: Any = None
        self._submitted = 0
        self._done = 0
        self._started = time.perf_counter()
        self._next_refresh = 0.0

    def __enter__(self) -> Progress:
        if self._enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]lines"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("lines", total=None, rate="")
            self._started = time.perf_counter()
        return self

    def submitted(self) -> None:
        self._submitted += 1

    def advance(self) -> None:
        self._done += 1
        if self._progress is not None:
            now = time.perf_counter()
            if now >= self._next_refresh:
                self._refresh(now)

    def _refresh(self, now: float) -> None:
        self._next_refresh = now + PROGRESS_REFRESH_S
        elapsed = now - self._started
        rate = f"{self._done / elapsed:,.0f}/s" if elapsed > 0 else ""
        self._progress.update(
            self._task, completed=self._done, total=self._submitted, rate=rate
        )

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._refresh(time.perf_counter())
            self._progress.stop()
