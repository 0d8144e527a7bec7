"""The `rewrite` command. Exit codes: 0 done, 1 bad input or failure, 2 usage, 3 quality gate.

Errors become one line on stderr naming the file, node and op; no tracebacks for user problems.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from rewriter.defaults import default
from rewriter.errors import (
    EXIT_FAILURE,
    EXIT_GATE,
    EXIT_OK,
    EXIT_USAGE,
    OnexoneError,
    UsageError,
    in_cli_terms,
)

__all__ = ["EXIT_FAILURE", "EXIT_GATE", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]


def _preprocess_help() -> str:
    """Every `--preprocess` key, read off `PreprocessOptions` so the help never lags the code."""
    from dataclasses import fields

    from rewriter.images import PreprocessOptions

    keys = ",".join(f.name for f in fields(PreprocessOptions))
    return ("for image folders, keys " + keys + ", e.g. size=640,resize=letterbox,augment=flip "
            "(YOLO) or size=224,resize=crop,mean=0.485+0.456+0.406,std=0.229+0.224+0.225")


def build_parser() -> argparse.ArgumentParser:
    from rewriter import __version__

    p = argparse.ArgumentParser(
        prog="rewrite",
        description="Rewrite an ONNX model with 1x1-convolution tricks and prove the result in "
        "onnxruntime.",
        epilog="exit codes: 0 done, 1 bad input or failure, 2 usage, 3 quality gate failed",
    )
    p.add_argument("model", nargs="?", help="input .onnx model")
    p.add_argument(
        "--pass",
        dest="passes",
        action="append",
        default=default("passes"),
        metavar="NAME[:k=v,...]",
        help="pass to run (repeatable, runs in order); list values use '+' (exclude=a*+b*)",
    )
    p.add_argument("-o", "--output", help="output path (default: MODEL.rewritten.onnx)")
    p.add_argument("--config", help="pipeline TOML file (passes, calibration, gates, outputs)")
    p.add_argument("--calib", help="calibration data: .npz, .npy, image folder, or 'random'")
    p.add_argument(
        "--eval",
        metavar="SPEC",
        help="data to measure fidelity on (same forms as --calib, e.g. a labelled "
        "test .npz); default: the held-out calibration samples",
    )
    p.add_argument(
        "--preprocess",
        metavar="k=v,...",
        help=_preprocess_help(),
    )
    p.add_argument(
        "--input-shape",
        action="append",
        default=default("input_shape"),
        metavar="NAME:D1,D2,...",
        help="fix dynamic input dims for analysis and benchmarking (never in the output)",
    )
    p.add_argument(
        "--report",
        action="append",
        default=default("report"),
        metavar="PATH",
        help="write the report (.json or .md; repeatable)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="plan only: print decisions, write nothing"
    )
    p.add_argument("--analyze", action="store_true", help="per-layer MACs/params and candidates")
    p.add_argument("--json", action="store_true", help="with --analyze: JSON on stdout only")
    p.add_argument("--list-passes", action="store_true", help="list passes, options and defaults")
    p.add_argument(
        "--report-schema", action="store_true", help="print the JSON schema of --report out.json"
    )
    p.add_argument(
        "--distill",
        nargs="?",
        const="",
        metavar="k=v,...",
        help="after the passes, train the weights they created against the original's "
        "outputs on --calib inputs (torch extra), e.g. steps=500,lr=1e-3",
    )
    p.add_argument(
        "--seed", type=int, default=default("seed"), help="seed for sampling and training (>= 0)"
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=default("holdout"),
        help="share of calibration samples held out for fidelity (default 0.25)",
    )
    p.add_argument("--max-drop", type=float, help="gate: max drop of accuracy / top-1 agreement")
    p.add_argument("--min-cosine", type=float, help="gate: min output cosine similarity")
    p.add_argument("--min-speedup", type=float, help="gate: min measured speedup (needs --bench)")
    from rewriter.compare import add_fidelity_arguments

    add_fidelity_arguments(p)  # --groups, --metric, --max-flip, --min-samples
    p.add_argument(
        "--keep-failed", action="store_true", help="write the model even if a gate fails"
    )
    p.add_argument("--bench", action="store_true", help="measure latency in onnxruntime (A/B)")
    p.add_argument(
        "--threads",
        type=int,
        default=default("threads"),
        help="onnxruntime intra-op threads (default 1; 0: onnxruntime's choice)",
    )
    p.add_argument(
        "--batch", type=int, action="append", default=default("batch"),
        help="benchmark batch size(s)",
    )
    p.add_argument("--plot", help="write a PNG of per-layer MACs and latency (needs [plot] extra)")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary on the terminal")
    p.add_argument("--version", action="version", version=f"onexone {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"]:  # `rewrite compare A.onnx B.onnx --calib DATA`
        from rewriter.compare import main as compare_main

        return compare_main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 0 for --help/--version, 2 for usage
        return int(exc.code or 0)
    console = make_console(stderr=args.json, quiet=args.quiet)
    from rewriter.lastresort import quiet_libraries, sigterm_as_interrupt, unexpected_error

    try:
        with sigterm_as_interrupt(), quiet_libraries():
            return run(args, parser, console)
    except OnexoneError as exc:
        print(f"rewrite: error: {in_cli_terms(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("rewrite: interrupted; nothing written", file=sys.stderr)
        return EXIT_FAILURE
    except MemoryError:
        print("rewrite: error: out of memory; nothing written", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # last resort: one line, never a raw traceback
        print(f"rewrite: error: {unexpected_error(exc)}", file=sys.stderr)
        if os.environ.get("ONEXONE_DEBUG") == "1":
            import traceback

            traceback.print_exc()
        return EXIT_FAILURE


def make_console(*, stderr: bool = False, quiet: bool = False) -> Console:
    """Rich console; wide and plain when not a terminal (logs, CI) so tables are not cut."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr, quiet=quiet)
    return Console(stderr=stderr, quiet=quiet, width=200, no_color=True, highlight=False)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, console: Console) -> int:
    from rewriter.shapes import parse_input_shapes

    if args.list_passes:
        _list_passes(console)
        return EXIT_OK
    if args.report_schema:
        from rewriter.resources import report_schema_path

        sys.stdout.write(report_schema_path().read_text())
        return EXIT_OK
    if args.config:
        from rewriter.config import apply_config

        apply_config(args, Path(args.config))
    if not args.model:
        parser.print_usage(sys.stderr)
        print("rewrite: error: MODEL is required", file=sys.stderr)
        return EXIT_USAGE
    try:
        shapes = parse_input_shapes(args.input_shape)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not args.analyze and not args.passes:
        raise UsageError("nothing to do: give --pass NAME (see --list-passes) or --analyze")
    from rewriter.validate import validate_cli_args

    validate_cli_args(args)  # everything checked before the model or any data is read
    from rewriter.io import load

    model = load(args.model)
    from rewriter.paths import check_run_paths

    check_run_paths(args, model)  # no output may replace an input, before any work
    from rewriter.validate import check_output_suffixes

    check_output_suffixes(args)
    if args.analyze:
        return _analyze(model, shapes, args, console)
    from rewriter.job import run_job

    return run_job(model, shapes, args, console)


def _analyze(model: Any, shapes: dict, args: argparse.Namespace, console: Console) -> int:
    """Per-layer table; never totals that leave unknown nodes out (shapes from --calib or
    --input-shape, else an error saying exactly what to add)."""
    from rewriter.analysis import analyze
    from rewriter.outputs import write_text
    from rewriter.render import print_analysis, print_inputs
    from rewriter.shape_hint import model_inputs, shapes_needed

    if args.calib is not None:
        from rewriter.calibration import data_input_shapes, load_calibration

        data = load_calibration(args.calib, model, input_shapes=shapes,
                                preprocess=args.preprocess, seed=args.seed)
        shapes = {**data_input_shapes(model, data), **shapes}
    analysis = analyze(model, shapes)
    analysis.inputs = model_inputs(model)
    if analysis.unknown:
        if not args.json:
            print_inputs(analysis.inputs, console)
        raise OnexoneError(shapes_needed(model, len(analysis.unknown), "cannot count MACs"))
    if args.json:
        sys.stdout.write(json.dumps(analysis.to_dict(), indent=2) + "\n")
    else:
        if shapes:
            fixed = " ".join(f"{k}:{','.join(map(str, v))}" for k, v in shapes.items())
            console.print(f"analysed at {fixed}" + (" (from --calib)" if args.calib else ""))
        print_analysis(analysis, console)
    for path in args.report:
        write_text(Path(path), json.dumps(analysis.to_dict(), indent=2) + "\n")
    return EXIT_OK


def _list_passes(console: Console) -> None:
    from rewriter.passes import available, describe_options

    for name, cls in available().items():
        console.print(f"[bold]{name}[/bold]: {cls.summary}")
        for opt, value, text in describe_options(cls.Options):
            console.print(f"    {opt}={value}  {text}")


if __name__ == "__main__":
    sys.exit(main())
