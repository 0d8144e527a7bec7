"""Progress for long steps, showing the whole job: the stage (`pass 2/4 bottleneck`), the step
(`refit layer 3/34`), elapsed time and ETA. Off unless the CLI asks.

The Python API never prints: `track` and `Counter` are pass-throughs until a caller activates a
reporter with `show_progress(console)`. On an interactive terminal the reporter draws rich bars;
elsewhere (CI logs, pipes) it prints one plain line per step at most every `LINE_INTERVAL_S`
seconds, so a log shows where a long run is without flooding it (short runs print nothing).
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

#: Plain-line reporter: seconds between two lines about the same step.
LINE_INTERVAL_S = 10.0

_active: contextvars.ContextVar[_Reporter | None] = contextvars.ContextVar(
    "onexone_progress", default=None
)
_stage: contextvars.ContextVar[str] = contextvars.ContextVar("onexone_stage", default="")


def duration(seconds: float) -> str:
    """65 -> '1m05s'; 7 -> '7s'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def progress_line(stage: str, what: str, done: int, total: int | None, elapsed: float) -> str:
    """`[pass 2/4 bottleneck] refit layer 3/34, 12s elapsed, ETA 2m10s`."""
    count = f"{done}/{total}" if total else f"{done}"
    eta = ""
    if total and done:
        eta = f", ETA {duration(elapsed / done * (total - done))}"
    prefix = f"[{stage}] " if stage else ""
    return f"{prefix}{what} {count}, {duration(elapsed)} elapsed{eta}"


class _Reporter:
    """Bars on a terminal, throttled plain lines elsewhere."""

    def __init__(self, console: Console, bars: Progress | None) -> None:
        self.console = console
        self.bars = bars

    def start(self, what: str, total: int | None) -> _Task:
        return _Task(self, what, total)


class _Task:
    def __init__(self, reporter: _Reporter, what: str, total: int | None) -> None:
        self.reporter, self.what, self.total = reporter, what, total
        self.done = 0
        self.started = self.last_line = time.monotonic()
        stage = _stage.get()
        self.stage = stage
        self.bar = None
        if reporter.bars is not None:
            label = f"[{stage}] {what}" if stage else what
            self.bar = reporter.bars.add_task(label, total=total)

    def advance(self, steps: int = 1) -> None:
        self.done += steps
        if self.bar is not None:
            self.reporter.bars.advance(self.bar, steps)  # type: ignore[union-attr]
            return
        now = time.monotonic()
        if now - self.last_line >= LINE_INTERVAL_S:
            self.last_line = now
            self.reporter.console.print(
                progress_line(self.stage, self.what, self.done, self.total, now - self.started),
                markup=False, highlight=False,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.reporter.bars.remove_task(self.bar)  # type: ignore[union-attr]
        elif time.monotonic() - self.started >= LINE_INTERVAL_S:  # it was long: say it ended
            self.reporter.console.print(
                progress_line(self.stage, self.what, self.done, self.total,
                              time.monotonic() - self.started) + " (done)",
                markup=False, highlight=False,
            )


@contextlib.contextmanager
def show_progress(console: Console) -> Iterator[None]:
    """Within this block `track`/`Counter` report on `console`: bars on a terminal, else lines."""
    if console.quiet:
        yield
        return
    bars = None
    if console.is_terminal:
        bars = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=True,
        )
    token = _active.set(_Reporter(console, bars))
    try:
        if bars is None:
            yield
        else:
            with bars:
                yield
    finally:
        _active.reset(token)


def set_stage(stage: str) -> None:
    """Name the part of the job now running (`pass 2/4 bottleneck`); prefixes every step."""
    _stage.set(stage)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yield `items`, advancing a bar when a reporter is active (a plain loop otherwise)."""
    reporter = _active.get()
    if reporter is None:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    task = reporter.start(description, total)
    try:
        for item in items:
            yield item
            task.advance()
    finally:
        task.close()


class Counter:
    """Steps done by hand (`layers = Counter(34, "refit layer")`, then `layers.advance()`),
    for loops whose unit is not one item of an iterable (groups of layers fitted together)."""

    def __init__(self, total: int | None, description: str) -> None:
        reporter = _active.get()
        self._task = reporter.start(description, total) if reporter is not None else None

    def advance(self, steps: int = 1) -> None:
        if self._task is not None:
            self._task.advance(steps)

    def close(self) -> None:
        if self._task is not None:
            self._task.close()
            self._task = None

    def __enter__(self) -> Counter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_active() -> bool:
    return _active.get() is not None
