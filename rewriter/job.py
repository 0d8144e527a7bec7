"""The CLI's rewrite job: passes, optional benchmark, quality gates, then outputs.

Order matters for safety: everything is measured and gated in memory first; the model is written
(atomically, validated) only when the gates pass or `--keep-failed` is given.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import onnx_ir as ir
from rich.console import Console

from rewriter.atomic import commit_file, discard, stage_bytes, write_bytes_atomic
from rewriter.errors import InternalCheckError
from rewriter.gates import evaluate_gates
from rewriter.io import META_SOURCE, stage
from rewriter.pipeline import RewriteResult, rewrite
from rewriter.render import print_run_report

EXIT_OK, EXIT_GATE = 0, 3


def default_output(model_path: str) -> Path:
    """`model.onnx` -> `model.rewritten.onnx` beside the input."""
    path = Path(model_path)
    return path.with_name(f"{path.stem}.rewritten{path.suffix or '.onnx'}")


def run_job(model: ir.Model, shapes: dict, args: argparse.Namespace, console: Console) -> int:
    from rewriter.paths import check_run_paths
    from rewriter.progress import show_progress

    check_run_paths(args, model)
    started = time.perf_counter()
    with show_progress(console):
        result, shapes = _rewrite(model, shapes, args, console)
        report = result.report
        _refuse_discarded(result, args)
        if args.bench:
            from rewriter.bench import benchmark_models

            report.latency = benchmark_models(
                result.original,
                result.model,
                shapes,
                threads=args.threads,
                batches=args.batch or [1],
                data=result.holdout,
                seed=args.seed,
            )
    source = model.meta.get(META_SOURCE)
    if source:
        report.file_size_before = Path(source).stat().st_size
    report.gates = evaluate_gates(
        report, args.max_drop, args.min_cosine, args.min_speedup, getattr(args, "max_flip", None)
    )
    failed = [g for g in report.gates if not g["passed"]]
    report.options.update(_cli_options(args))

    output = (
        None if args.dry_run else Path(args.output) if args.output else default_output(args.model)
    )
    staged_model = None
    pending: list[tuple[Path, Path]] = []  # (staged temp file, final path)
    try:
        if output is not None and (not failed or args.keep_failed):
            staged_model = stage(result.model, output)
            report.output, report.written = str(staged_model.out), True
            report.file_size_after = staged_model.nbytes
        elif output is not None:
            report.output = str(output)
            report.warnings.append(
                f"quality gate failed: {output} not written (use --keep-failed)"
            )
        report.tool = {
            "wall_s": round(time.perf_counter() - started, 3), "peak_rss_mb": _peak_rss_mb()
        }
        # Report and plot are staged before the model is committed: a failure writing them
        # (full disk) leaves no model behind and exits 1.
        if args.plot:
            from rewriter.plot import render_plot

            png = render_plot(report, result.original, result.model, shapes)
            pending.append((stage_bytes(Path(args.plot), png, label=f"--plot {args.plot}"),
                            Path(args.plot)))
        for path in args.report:
            pending.append((stage_bytes(Path(path), report_bytes(report, Path(path)),
                                        label=f"--report {path}"), Path(path)))
        for tmp, final in pending:
            commit_file(tmp, final)
        pending = []
        if staged_model is not None:
            staged_model.commit()
    finally:
        for tmp, _ in pending:
            discard(tmp)
        if staged_model is not None:
            staged_model.discard()
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    print_run_report(report, console)
    if args.dry_run:
        console.print("dry run: no model written")
    elif report.written:
        console.print(f"wrote {report.output}")
    return EXIT_GATE if failed else EXIT_OK


def _rewrite(
    model: ir.Model, shapes: dict, args: argparse.Namespace, console: Console
) -> tuple[RewriteResult, dict]:
    """Run the passes; dynamic dims are filled from the calibration samples by `rewrite`."""
    result = rewrite(
        model,
        args.passes,
        calib=args.calib,
        input_shapes=shapes,
        preprocess=args.preprocess,
        holdout=args.holdout,
        seed=args.seed,
        distill=getattr(args, "distill", None),
        evaluate=args.eval,
        groups=getattr(args, "groups", None) or None,
        metric=getattr(args, "metric", None),
        max_drop=args.max_drop,
        min_samples=getattr(args, "min_samples", None),
        log=lambda message: console.print(f"[dim]{message}[/dim]"),
    )
    return result, result.input_shapes


def _cli_options(args: argparse.Namespace) -> dict[str, Any]:
    """What the command line asked for beyond the passes (recorded in the report's options)."""
    return {
        "preprocess": args.preprocess,
        "bench": bool(args.bench),
        "threads": args.threads,
        "batch": list(args.batch or [1]),
        "gates": {
            "max_drop": args.max_drop,
            "min_cosine": args.min_cosine,
            "min_speedup": args.min_speedup,
            "max_flip": getattr(args, "max_flip", None),
        },
        "metric": getattr(args, "metric", None),
        "keep_failed": bool(args.keep_failed),
        "dry_run": bool(args.dry_run),
        "config": args.config,
    }


def _refuse_discarded(result: RewriteResult, args: argparse.Namespace) -> None:
    """A pass the numerical guard caught is a bug: write the reports, no model, exit 1."""
    if not result.discarded:
        return
    for path in args.report:
        write_report(result.report, Path(path))
    more = f" (and {len(result.discarded) - 1} more)" if len(result.discarded) > 1 else ""
    raise InternalCheckError(f"{result.discarded[0]}{more}; nothing written")


def write_report(report: Any, path: Path) -> None:
    """JSON or Markdown by the file's extension, written atomically."""
    write_bytes_atomic(path, report_bytes(report, path), label=f"--report {path}")


def report_bytes(report: Any, path: Path) -> bytes:
    """The report as the file `path` asks for: Markdown for `.md`, else JSON."""
    if path.suffix.lower() == ".md":
        return report.to_markdown().encode()
    return (json.dumps(report.to_dict(), indent=2) + "\n").encode()


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
