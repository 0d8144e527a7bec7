"""`rewrite compare A.onnx B.onnx --calib DATA`: per-group fidelity, the user's metric and A/B
latency for two models made by anything (a quantizer, another optimizer, a retrain).

A is the reference. Nothing is chosen on the data, so every calibration sample is measured.
Exit codes as for `rewrite`: 0 done, 1 bad input, 2 usage, 3 a quality gate failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from rewriter.errors import (  # noqa: F401  (exit codes re-exported for callers)
    EXIT_FAILURE,
    EXIT_GATE,
    EXIT_OK,
    EXIT_USAGE,
    OnexoneError,
    UsageError,
    in_cli_terms,
)


def add_fidelity_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by `rewrite` and `rewrite compare`: groups, user metric, evidence, flips."""
    p.add_argument(
        "--groups",
        action="append",
        default=[],
        metavar="OUT:NAME=A-B+...",
        help="output groups to measure, rows inclusive, e.g. output0:box=0-3+cls=4-13 "
        "(A-B%%K: every K-th row, e.g. keypoint x=5-53%%3; default: found from the original's "
        "outputs; repeatable)",
    )
    p.add_argument(
        "--metric",
        metavar="MODULE:FUNC",
        help="your metric: module:function or file.py:function taking a model path, returning "
        "a number or a dict with 'primary' (higher is better); --max-drop then gates its drop",
    )
    p.add_argument(
        "--max-flip",
        type=float,
        help="gate: max share of thresholded score decisions that flip (default 0.04 with "
        "--min-cosine)",
    )
    p.add_argument(
        "--min-samples",
        type=int,
        help="fewest held-out samples target=auto may choose on (default 16)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rewrite compare",
        description="Compare model B against reference model A: fidelity per output group, "
        "your metric on both, and A/B latency.",
        epilog="exit codes: 0 done, 1 bad input or failure, 2 usage, 3 quality gate failed",
    )
    p.add_argument("reference", metavar="A.onnx", help="reference model")
    p.add_argument("candidate", metavar="B.onnx", help="model compared against A")
    p.add_argument("--calib", required=True, help="data: .npz, .npy, image folder, or 'random'")
    p.add_argument("--preprocess", help="for image folders: size=224,mean=...,std=...")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D1,D2,...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-drop", type=float, help="gate: max drop of --metric / accuracy / top-1")
    p.add_argument("--min-cosine", type=float, help="gate: min cosine of the worst output group")
    p.add_argument("--min-speedup", type=float, help="gate: min measured speedup (needs --bench)")
    p.add_argument("--bench", action="store_true", help="measure A/B latency in onnxruntime")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, action="append", default=[])
    p.add_argument("--report", action="append", default=[], metavar="PATH",
                   help="write the report (.json or .md; repeatable)")
    p.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true")
    add_fidelity_arguments(p)
    return p


def main(argv: list[str]) -> int:
    from rewriter.cli import make_console

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    console = make_console(stderr=args.json, quiet=args.quiet)
    try:
        return run_compare(args, console)
    except OnexoneError as exc:
        print(f"rewrite compare: error: {in_cli_terms(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("rewrite compare: interrupted", file=sys.stderr)
        return EXIT_FAILURE


def run_compare(args: argparse.Namespace, console: Any) -> int:
    import json

    from rewriter.gates import evaluate_gates
    from rewriter.outputs import write_report
    from rewriter.render import print_run_report

    started = time.perf_counter()
    report = compare_models(
        args.reference,
        args.candidate,
        calib=args.calib,
        preprocess=args.preprocess,
        input_shapes=_shapes(args.input_shape),
        groups=args.groups or None,
        metric=args.metric,
        seed=args.seed,
        bench=args.bench,
        threads=args.threads,
        batches=args.batch or [1],
        log=lambda message: console.print(f"[dim]{message}[/dim]"),
    )
    report.gates = evaluate_gates(
        report, args.max_drop, args.min_cosine, args.min_speedup, args.max_flip
    )
    report.options["gates"] = {
        "max_drop": args.max_drop,
        "min_cosine": args.min_cosine,
        "min_speedup": args.min_speedup,
        "max_flip": args.max_flip,
    }
    report.tool = {"wall_s": round(time.perf_counter() - started, 3)}
    for path in args.report:
        write_report(report, Path(path))
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    print_run_report(report, console)
    return EXIT_GATE if any(not g["passed"] for g in report.gates) else EXIT_OK


def _shapes(specs: list[str]) -> dict[str, tuple[int, ...]]:
    from rewriter.shapes import parse_input_shapes

    try:
        return parse_input_shapes(specs)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def compare_models(
    reference: str,
    candidate: str,
    *,
    calib: Any,
    preprocess: str | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    groups: Any = None,
    metric: Any = None,
    seed: int = 0,
    bench: bool = False,
    threads: int = 1,
    batches: list[int] | None = None,
    log: Any = None,
) -> Any:
    """The comparison as a `RunReport` (no passes; `model` is A, `output` is B)."""
    from rewriter import runtime
    from rewriter.calibration import data_input_shapes, load_calibration
    from rewriter.evidence import few_samples_warning, narrow_calibration_warnings
    from rewriter.fidelity import task_fidelity
    from rewriter.groups import bind_groups, coerce_groups, format_groups
    from rewriter.io import load
    from rewriter.pipeline import analysis_cost
    from rewriter.report import RunReport

    log = log or (lambda message: None)
    given = coerce_groups(groups)
    loaded_metric = None
    if metric is not None:
        from rewriter.usermetric import load_metric

        loaded_metric = load_metric(metric)
    model_a, model_b = load(reference), load(candidate)
    _check_interfaces(model_a, model_b, reference, candidate)
    shapes = dict(input_shapes or {})
    data = load_calibration(calib, model_a, input_shapes=shapes, preprocess=preprocess, seed=seed)
    shapes = {**data_input_shapes(model_a, data), **shapes}
    report = RunReport(model=str(reference), output=str(candidate))
    report.options = {
        "command": "compare",
        "passes": [],
        "calib": calib if isinstance(calib, str) else None,
        "input_shapes": {k: list(v) for k, v in shapes.items()},
        "seed": seed,
        "bench": bool(bench),
        "metric": metric if isinstance(metric, str) else None,
    }
    cost_a, cost_b = analysis_cost(model_a, shapes), analysis_cost(model_b, shapes)
    report.macs_before, report.params_before = cost_a.macs, cost_a.params
    report.macs_after, report.params_after = cost_b.macs, cost_b.params
    report.file_size_before = _size(Path(reference))
    report.file_size_after = _size(Path(candidate))
    log(f"running {reference} and {candidate} on {data.n} samples from {data.source}")
    ref = runtime.run_all(model_a, data.inputs)
    got = runtime.run_all(model_b, data.inputs)
    for name, array in ref.items():
        if np.shape(got[name]) != np.shape(array):
            raise OnexoneError(
                f"{candidate}: output '{name}' has shape {list(np.shape(got[name]))}, "
                f"{reference} gives {list(np.shape(array))}"
            )
    bound = bind_groups(given, ref)
    report.options["groups"] = format_groups(bound) or None
    report.fidelity = task_fidelity(ref, got, bound, data.labels)
    report.fidelity.update(samples=data.n, synthetic=data.synthetic, dataset=data.source,
                           split="eval")
    if data.synthetic:
        report.warnings.append("calibration data is random: fidelity is a smoke test")
    report.warnings.extend(narrow_calibration_warnings(data, ref, seed))
    warning = few_samples_warning(data.n, data.source)
    if warning:
        report.warnings.append(warning)
    if loaded_metric is not None:
        from rewriter.usermetric import metric_summary

        log(f"metric {loaded_metric.spec}: evaluating both models")
        before = loaded_metric.evaluate(reference)
        after = loaded_metric.evaluate(candidate)
        report.metric = metric_summary(loaded_metric, before, after)
    if bench:
        from rewriter.bench import benchmark_models

        report.latency = benchmark_models(
            model_a, model_b, shapes, threads=threads, batches=batches or [1], data=data,
            seed=seed,
        )
    return report


def _check_interfaces(a: Any, b: Any, path_a: str, path_b: str) -> None:
    """Same input and output names, or there is nothing to compare."""
    from rewriter.calibration import model_input_specs

    inputs_a = {s.name for s in model_input_specs(a)}
    inputs_b = {s.name for s in model_input_specs(b)}
    if inputs_a != inputs_b:
        raise OnexoneError(
            f"{path_b}: inputs {sorted(inputs_b)} differ from {path_a}'s {sorted(inputs_a)}"
        )
    outputs_a = [v.name for v in a.graph.outputs]
    outputs_b = {v.name for v in b.graph.outputs}
    missing = [n for n in outputs_a if n not in outputs_b]
    if missing:
        raise OnexoneError(f"{path_b}: has no output '{missing[0]}' that {path_a} has")


def _size(path: Path) -> int | None:
    files = [path, path.with_name(path.name + ".data")]
    return sum(p.stat().st_size for p in files if p.exists()) or None
