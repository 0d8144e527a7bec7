"""What the CLI does with what it did not foresee: SIGTERM, library log noise, stray exceptions.

Known failure classes from libraries (disk errors, linear algebra, onnxruntime) become one line
that names them; anything else is called an internal error (a bug to report), still one line,
with the traceback shown when `ONEXONE_DEBUG=1`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

#: Loggers of libraries whose INFO/WARNING lines would sit beside our one-line error.
_NOISY_LOGGERS = ("onnx_ir", "onnxscript")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so temp files are removed and nothing half-written stays."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Only errors from onnx-ir's loggers ("Skipped deduplication ..." is not for users)."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def unexpected_error(exc: BaseException) -> str:
    """One line for an exception that is not ours: its class when known, else internal."""
    import numpy as np

    text = " ".join(str(exc).split())[:300] or type(exc).__name__
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        return f"{exc.strerror or text}{where}; nothing written"
    if isinstance(exc, np.linalg.LinAlgError):
        return f"linear algebra failed ({text}); the calibration data may be degenerate"
    if type(exc).__module__.startswith("onnxruntime"):
        return f"onnxruntime failed: {text}"
    return (f"internal error: {type(exc).__name__}: {text} (a bug; rerun with ONEXONE_DEBUG=1 "
            "for the traceback and report it)")
