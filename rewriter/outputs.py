"""Text outputs of a run (reports, analysis JSON), written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rewriter.defaults import REPORT_SUFFIXES
from rewriter.errors import UsageError


def write_text(path: Path, text: str) -> None:
    """Atomic text write (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(report: Any, path: Path) -> None:
    """JSON or Markdown by the file's suffix (anything else is refused), written atomically."""
    suffix = path.suffix.lower()
    if suffix not in REPORT_SUFFIXES:
        raise UsageError(f"report {path}: unknown suffix (write .json or .md)")
    if suffix == ".md":
        write_text(path, report.to_markdown())
    else:
        write_text(path, json.dumps(report.to_dict(), indent=2) + "\n")
