"""Atomic file writes, writer locks and stale temp cleanup, written once for every output.

Every file the tool writes (model, data file, report, plot) is first written under a hidden
`.onexone-<pid>-*` name in the target's folder, flushed, then renamed into place: a reader sees
the old file or the new one, never half of one. The pid in the name lets a later run remove what
a killed run left behind (its owner is gone), and never what a running writer is still using.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from rewriter.errors import ModelSaveError

TEMP_PREFIX = ".onexone-"
_TEMP_OWNER = re.compile(r"^\.onexone-(\d+)-")

#: Test hook: called with a stage name ("data-renamed", ...) between the renames of a commit, so
#: tests can simulate a kill at the worst moment. `ONEXONE_FAULT=<stage>` kills the process there.
fault_hook: Callable[[str], None] | None = None


def fault_point(stage: str) -> None:
    """Run the fault-injection hook for `stage` (no-op unless a test installed one)."""
    if fault_hook is not None:
        fault_hook(stage)
    if os.environ.get("ONEXONE_FAULT") == stage:
        os.kill(os.getpid(), 9)


def temp_prefix() -> str:
    """Prefix of this process's temp files and folders (the pid names their owner)."""
    return f"{TEMP_PREFIX}{os.getpid()}-"


def make_temp_dir(folder: Path) -> Path:
    """A private (0700) temp folder beside the output, removed by a later run if we die."""
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    return Path(tempfile.mkdtemp(prefix=temp_prefix(), dir=folder))


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove `.onexone-<pid>-*` files and folders whose owner process no longer exists."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_OWNER.match(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def write_bytes_atomic(path: Path, data: bytes, *, label: str | None = None) -> Path:
    """Write `data` to `path` via a flushed temp file in the same folder and one rename."""
    staged = stage_bytes(path, data, label=label)
    commit_file(staged, path, label=label)
    return path


def stage_bytes(path: Path, data: bytes, *, label: str | None = None) -> Path:
    """Write `data` to a flushed temp file beside `path` (nothing visible yet); returns it."""
    path = Path(path)
    label = label or str(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ModelSaveError(
            f"{label}: cannot write ({_os_reason(exc)}); nothing written"
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            _write_all(f, data)
        os.chmod(tmp, _umask_mode())
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise ModelSaveError(
                f"{label}: cannot write ({_os_reason(exc)}); nothing written"
            ) from None
        raise
    return Path(tmp)


def _write_all(f, data: bytes) -> None:
    """Write, flush and fsync (a full disk fails here, before anything is renamed)."""
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def commit_file(staged: Path, path: Path, *, label: str | None = None) -> None:
    """Rename a staged temp file into place (the temp is removed when that fails)."""
    try:
        os.replace(staged, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(staged)
        raise ModelSaveError(f"{label or path}: cannot write ({_os_reason(exc)})") from None


def discard(staged: Path | None) -> None:
    """Remove a staged temp file or folder (quietly; it may already be gone)."""
    if staged is None:
        return
    with contextlib.suppress(OSError):
        if staged.is_dir():
            shutil.rmtree(staged)
        else:
            staged.unlink()


@contextlib.contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """Serialise writers of one output: an exclusive fcntl lock on `.<name>.onexone.lock`.

    The lock file stays (removing it would let a third writer lock a different inode).
    """
    lock = path.parent / f".{path.name}.onexone.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ModelSaveError(f"{path}: cannot lock ({_os_reason(exc)})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__
