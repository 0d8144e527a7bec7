"""The CLI's rewrite job: passes, optional benchmark, quality gates, then outputs.

Order matters for safety: everything is measured and gated in memory first; the model is written
(atomically, validated) only when the gates pass or `--keep-failed` is given.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Any

import onnx_ir as ir
from rich.console import Console

from rewriter.gates import evaluate_gates
from rewriter.io import META_SOURCE, save
from rewriter.pipeline import rewrite
from rewriter.render import print_run_report

EXIT_OK, EXIT_GATE = 0, 3


def default_output(model_path: str) -> Path:
    """`model.onnx` -> `model.rewritten.onnx` beside the input."""
    path = Path(model_path)
    return path.with_name(f"{path.stem}.rewritten{path.suffix or '.onnx'}")


def run_job(model: ir.Model, shapes: dict, args: argparse.Namespace, console: Console) -> int:
    started = time.perf_counter()
    result = rewrite(
        model,
        args.passes,
        calib=args.calib,
        input_shapes=shapes,
        preprocess=args.preprocess,
        holdout=args.holdout,
        seed=args.seed,
        log=lambda message: console.print(f"[dim]{message}[/dim]") if not args.json else None,
    )
    report = result.report
    source = model.meta.get(META_SOURCE)
    if source:
        report.file_size_before = Path(source).stat().st_size
    if args.bench:
        from rewriter.bench import benchmark_models

        report.latency = benchmark_models(
            result.original, result.model, shapes, threads=args.threads,
            batches=args.batch or [1], data=result.holdout,
        )
    report.gates = evaluate_gates(report, args.max_drop, args.min_cosine, args.min_speedup)
    failed = [g for g in report.gates if not g["passed"]]
    report.tool = {"wall_s": round(time.perf_counter() - started, 3), "peak_rss_mb": _peak_rss_mb()}

    output = None if args.dry_run else Path(args.output) if args.output else default_output(args.model)
    if output is not None and (not failed or args.keep_failed):
        written = save(result.model, output)
        report.output, report.written = str(written), True
        report.file_size_after = sum(
            p.stat().st_size for p in (written, written.with_name(written.name + ".data")) if p.exists()
        )
    elif output is not None:
        report.output = str(output)
        report.warnings.append(f"quality gate failed: {output} not written (use --keep-failed)")
    for path in args.report:
        write_report(report, Path(path))
    print_run_report(report, console)
    if args.dry_run:
        console.print("dry run: nothing written")
    elif report.written:
        console.print(f"wrote {report.output}")
    return EXIT_GATE if failed else EXIT_OK


def write_report(report: Any, path: Path) -> None:
    """JSON or Markdown by the file's extension, written atomically."""
    from rewriter.cli import _write_text

    if path.suffix.lower() == ".md":
        _write_text(path, report.to_markdown())
    else:
        _write_text(path, json.dumps(report.to_dict(), indent=2) + "\n")


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
