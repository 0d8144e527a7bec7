"""Text outputs of a run (reports, analysis JSON), written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rewriter.atomic import write_bytes_atomic
from rewriter.defaults import REPORT_SUFFIXES
from rewriter.errors import UsageError


def write_text(path: Path, text: str, label: str | None = None) -> None:
    """Atomic text write (flushed temp file in the same folder, then rename)."""
    write_bytes_atomic(path, text.encode(), label=label or str(path))


def report_bytes(report: Any, path: Path) -> bytes:
    """The report as the file `path` asks for: Markdown for `.md`, JSON for `.json`; any other
    suffix is refused (a report silently written as JSON under `.txt` is a surprise)."""
    suffix = path.suffix.lower()
    if suffix not in REPORT_SUFFIXES:
        raise UsageError(f"report {path}: unknown suffix (write .json or .md)")
    if suffix == ".md":
        return report.to_markdown().encode()
    return (json.dumps(report.to_dict(), indent=2) + "\n").encode()


def write_report(report: Any, path: Path) -> None:
    """JSON or Markdown by the file's suffix, written atomically."""
    write_bytes_atomic(path, report_bytes(report, path), label=f"--report {path}")
