"""Every path a run reads against every path it writes, checked once before any work.

A run reads the model and its external data files, calibration and eval data, the config file
and a metric module; it writes `-o` (and its data file), reports and a plot. Paths are compared
after resolving links and `..` (and by inode, for hard links), so no spelling lets an output
replace an input or another output. Outputs must be regular files or absent, in a folder that
can take a new file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from rewriter.errors import UsageError

#: Data files of output `out.onnx` are `out.onnx.<8 hex digits>.data` (named by content hash).
DATA_SUFFIX = ".data"


def data_file_name(output_name: str, digest: str) -> str:
    """Name of the data file written beside output `output_name` for content `digest`."""
    return f"{output_name}.{digest[:8]}{DATA_SUFFIX}"


def is_data_file_of(candidate: str, output_name: str) -> bool:
    """True when `candidate` is (or could be) a data file the tool writes for `output_name`."""
    if candidate == f"{output_name}{DATA_SUFFIX}":
        return True
    pattern = re.escape(output_name) + r"\.[0-9a-f]{8}" + re.escape(DATA_SUFFIX)
    return re.fullmatch(pattern, candidate) is not None


@dataclass
class RunPaths:
    """(what the path is, the path) for everything a run reads and writes."""

    reads: list[tuple[str, Path]] = field(default_factory=list)
    writes: list[tuple[str, Path]] = field(default_factory=list)
    #: Writes that are ONNX models (each comes with data files beside it).
    models: list[Path] = field(default_factory=list)


def run_paths(args: argparse.Namespace, model: ir.Model | None = None) -> RunPaths:
    """The reads and writes a CLI run implies (model data files when the model is loaded)."""
    from rewriter.io import META_DATA_FILES

    paths = RunPaths()
    if getattr(args, "model", None):
        paths.reads.append(("the input model", Path(args.model)))
    if model is not None:
        for data in model.meta.get(META_DATA_FILES) or []:
            paths.reads.append(("the input model's data file", Path(data)))
    for flag, dest in (("--config", "config"), ("--calib", "calib"), ("--eval", "eval")):
        value = getattr(args, dest, None)
        if isinstance(value, (str, os.PathLike)) and str(value) != "random":
            paths.reads.append((f"the {flag} data" if dest != "config" else "the --config file",
                                Path(value)))
    metric_file = _metric_file(getattr(args, "metric", None))
    if metric_file is not None:
        paths.reads.append(("the --metric module", metric_file))
    analyze = getattr(args, "analyze", False)
    if not analyze and not getattr(args, "dry_run", False) and getattr(args, "model", None):
        from rewriter.job import default_output

        output = Path(args.output) if getattr(args, "output", None) else default_output(args.model)
        paths.writes.append(("-o", output))
        paths.models.append(output)
    for report in getattr(args, "report", None) or []:
        paths.writes.append(("--report", Path(report)))
    if getattr(args, "plot", None) and not analyze:
        paths.writes.append(("--plot", Path(args.plot)))
    return paths


def _metric_file(spec: object) -> Path | None:
    """The file behind `--metric path/to/file.py:function` (module names are not files)."""
    if not isinstance(spec, str) or ":" not in spec:
        return None
    module = spec.rpartition(":")[0]
    return Path(module) if module.endswith(".py") or os.sep in module else None


def check_run_paths(args: argparse.Namespace, model: ir.Model | None = None) -> None:
    """Refuse (UsageError, exit 2) any output that overlaps an input, another output, or is
    not a place a regular file can be written."""
    check_paths(run_paths(args, model))


def check_paths(paths: RunPaths) -> None:
    for flag, path in paths.writes:
        problem = output_problem(path)
        if problem:
            raise UsageError(f"{flag} {path}: {problem}")
    for flag, path in paths.writes:
        for what, read in paths.reads:
            if _overlaps(path, read):
                raise UsageError(f"{flag} {path}: refusing to overwrite {what} ({read})")
    for model in paths.models:
        for what, read in paths.reads:
            if _same_folder(model, read) and is_data_file_of(_name(read), model.name):
                raise UsageError(f"-o {model}: its data file would replace {what} ({read})")
    for i, (flag, path) in enumerate(paths.writes):
        for other_flag, other in paths.writes[i + 1:]:
            if _overlaps(path, other) or _overlaps(other, path):
                raise UsageError(f"{flag} {path} and {other_flag} {other} are the same file; "
                                 "give each output its own path")
        for model in paths.models:
            if _same_folder(model, path) and is_data_file_of(_name(path), model.name):
                raise UsageError(f"{flag} {path}: is the name of the data file of -o {model}")


def output_problem(path: Path) -> str | None:
    """Why a regular file cannot be written at `path`, or None."""
    path = Path(path).expanduser()
    try:
        info = os.stat(path)
    except FileNotFoundError:
        info = None
    except NotADirectoryError:
        info = None  # reported below as "under a file"
    except OSError as exc:
        return f"cannot inspect ({exc.strerror or exc})"
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            return "is a directory (give a file path)"
        if not stat.S_ISREG(info.st_mode):
            return f"is a {_kind(info.st_mode)}, not a regular file; refusing to replace it"
    folder = _existing_ancestor(path.absolute().parent)
    if folder is None:
        return "no existing folder above it"
    if not folder.is_dir():
        return f"is under {folder}, which is a file, not a folder"
    return _probe(folder)


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), "special file")


def _existing_ancestor(folder: Path) -> Path | None:
    for candidate in (folder, *folder.parents):
        if os.path.lexists(candidate):
            return candidate
    return None


def _probe(folder: Path) -> str | None:
    """Create and remove one temp file: the only sure test that a folder takes new files
    (permissions, read-only mounts, /proc and /sys all answer here)."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".onexone-{os.getpid()}-probe-", dir=folder)
    except OSError as exc:
        return f"folder {folder} does not take new files ({exc.strerror or exc})"
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)
    return None


def _resolved(path: Path) -> str:
    return os.path.realpath(os.path.expanduser(str(path)))


def _name(path: Path) -> str:
    return os.path.basename(_resolved(path))


def _same_folder(a: Path, b: Path) -> bool:
    return os.path.dirname(_resolved(a)) == os.path.dirname(_resolved(b))


def _overlaps(write: Path, read: Path) -> bool:
    """`write` is `read` (any spelling, link or hard link) or lies inside folder `read`."""
    w, r = _resolved(write), _resolved(read)
    if w == r:
        return True
    if os.path.isdir(r) and w.startswith(r.rstrip(os.sep) + os.sep):
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(w, r)
    return False
