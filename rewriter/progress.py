"""Progress bars for long loops (calibration capture, benchmarking), off unless the CLI asks.

The Python API never prints: `track` is a pass-through until a caller activates a reporter with
`show_progress(console)`, which the CLI does only when its console is an interactive terminal.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")

_active: contextvars.ContextVar[Progress | None] = contextvars.ContextVar(
    "onexone_progress", default=None
)


@contextlib.contextmanager
def show_progress(console: Console) -> Iterator[None]:
    """Within this block `track` draws bars on `console`, if that is an interactive terminal."""
    if not console.is_terminal or console.quiet:
        yield
        return
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    )
    token = _active.set(progress)
    try:
        with progress:
            yield
    finally:
        _active.reset(token)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yield `items`, advancing a bar when a reporter is active (a plain loop otherwise)."""
    progress = _active.get()
    if progress is None:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    task = progress.add_task(description, total=total)
    try:
        for item in items:
            yield item
            progress.advance(task)
    finally:
        progress.remove_task(task)


def is_active() -> bool:
    return _active.get() is not None
