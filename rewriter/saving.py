"""`rewriter.save`: write a model, or a rewrite's result with its report brought up to date."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx_ir as ir

from rewriter import io


def save(model: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Validate and write `model` atomically (see `rewriter.io.save`); the written path.

    Given a `RewriteResult`, writes its model and records in its report where it went, that it
    was written, and the file size on disk (model plus external data).
    """
    if isinstance(model, ir.Model):
        return io.save(model, path, **kwargs)
    result = model
    written = io.save(result.model, path, **kwargs)
    record_written(result.report, written)
    return written


def record_written(report: Any, written: Path) -> None:
    """Output path, `written`, and file sizes (before: the source model's, when known)."""
    report.output, report.written = str(written), True
    report.file_size_after = sum(
        p.stat().st_size
        for p in (written, written.with_name(written.name + ".data"))
        if p.exists()
    )
    if report.file_size_before is None and report.model and Path(report.model).exists():
        report.file_size_before = Path(report.model).stat().st_size
