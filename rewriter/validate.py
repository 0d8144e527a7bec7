"""Validate everything, then run: every option of a run is checked before any data is read.

`check_run_arguments` speaks the Python API's terms (`holdout`, `seed`); `validate_cli_args`
checks a whole command line (after `--config` filled it) in flag terms: pass specs and their
options, `--distill`, `--preprocess`, numbers, gates against the measurements the run will make,
report and plot paths, and the optional extras the run needs. Each mistake is one line and exit
code 2 (1 for a missing extra), before the model's calibration data is loaded or a pass runs.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from rewriter.defaults import REPORT_SUFFIXES
from rewriter.errors import CalibrationError, UsageError


def check_number(
    value: Any,
    label: str,
    *,
    integer: bool = False,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> None:
    """A finite number within bounds, or a UsageError naming `label` and the value."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise UsageError(f"{label} must be {kind}, got {value!r}")
    if not math.isfinite(value):
        raise UsageError(f"{label} must be a finite number, got {value}")
    for bound, bad, text in (
        (ge, lambda b: value < b, ">="),
        (gt, lambda b: value <= b, ">"),
        (le, lambda b: value > b, "<="),
        (lt, lambda b: value >= b, "<"),
    ):
        if bound is not None and bad(bound):
            raise UsageError(f"{label} must be {text} {bound:g}, got {value:g}")


def check_run_arguments(*, holdout: float, seed: int) -> None:
    """The numeric arguments of `rewriter.rewrite` (API terms)."""
    check_number(holdout, "holdout", gt=0, lt=1)
    check_number(seed, "seed", integer=True, ge=0)


def validate_cli_args(args: argparse.Namespace) -> None:
    """Check the whole command line; raise on the first mistake, before any work."""
    _check_numbers(args)
    _check_passes(args.passes)
    if args.distill is not None:
        from rewriter.distill import parse_distill_options
        from rewriter.extras import require

        _relabel(lambda: parse_distill_options(args.distill), "--distill")
        require("torch", "finetune", "--distill")
    if args.preprocess is not None:
        from rewriter.images import parse_preprocess

        _relabel(lambda: parse_preprocess(args.preprocess), "--preprocess")
    _check_gates(args)
    _check_paths(args)


def _relabel(parse: Any, flag: str) -> None:
    """Run a parser whose messages start with its API name; say the flag instead."""
    from rewriter.errors import OptionError

    try:
        parse()
    except OptionError as exc:
        message = str(exc)
        for name in ("distill", "preprocess"):
            if message.startswith(f"{name}:"):
                message = f"{flag}:" + message[len(name) + 1 :]
        raise OptionError(message) from None


def _check_numbers(args: argparse.Namespace) -> None:
    check_number(args.seed, "--seed", integer=True, ge=0)
    check_number(args.holdout, "--holdout", gt=0, lt=1)
    check_number(args.threads, "--threads", integer=True, ge=0)
    for batch in args.batch or []:
        check_number(batch, "--batch", integer=True, ge=1)
    if args.max_drop is not None:
        check_number(args.max_drop, "--max-drop", ge=0, le=1)
    if args.min_cosine is not None:
        check_number(args.min_cosine, "--min-cosine", ge=-1, le=1)
    if args.min_speedup is not None:
        check_number(args.min_speedup, "--min-speedup", gt=0)
    if getattr(args, "max_flip", None) is not None:
        check_number(args.max_flip, "--max-flip", ge=0, le=1)
    if getattr(args, "min_samples", None) is not None:
        check_number(args.min_samples, "--min-samples", integer=True, ge=1)


def _check_passes(passes: list[Any]) -> None:
    """Every pass of the pipeline: its name and all its options."""
    from rewriter.passes import get_pass
    from rewriter.pipeline import parse_pass_spec

    for entry in passes:
        spec = parse_pass_spec(entry)
        get_pass(spec.name).parse(spec.options)


def _check_gates(args: argparse.Namespace) -> None:
    """A gate whose measurement the run will not make is a usage error now, not exit 3 later."""
    if args.min_speedup is not None and not args.bench:
        raise UsageError("--min-speedup needs --bench (the speedup is measured by the benchmark)")
    has_data = args.calib is not None or args.eval is not None
    fidelity_gates = (("--max-drop", args.max_drop), ("--min-cosine", args.min_cosine),
                      ("--max-flip", getattr(args, "max_flip", None)))
    if getattr(args, "metric", None) is not None:  # --max-drop then gates the user's metric
        fidelity_gates = fidelity_gates[1:]
    for flag, value in fidelity_gates:
        if value is not None and not has_data:
            raise UsageError(f"{flag} needs fidelity data: give --calib (or --eval)")
        if value is not None and args.calib == "random" and args.eval is None:
            raise UsageError(
                f"{flag} on random data proves nothing: give real samples with --calib or --eval"
            )


def _check_paths(args: argparse.Namespace) -> None:
    from rewriter.paths import check_run_paths

    # Overlaps first: "--report m.onnx would overwrite the input model" says more than its
    # suffix. An existing file is judged again once the model's data files are known.
    check_run_paths(args)
    check_output_suffixes(args, existing=False)
    if args.plot is not None:
        from rewriter.extras import require

        require("matplotlib", "plot", "--plot")
    if args.output is not None and Path(args.output).is_dir():
        raise UsageError(f"-o {args.output}: is a folder; give the output model's file name")
    for flag, spec in (("--calib", args.calib), ("--eval", args.eval)):
        if spec is None or str(spec) == "random":
            continue
        path = Path(spec)
        if not path.exists():
            raise CalibrationError(f"{flag} {spec}: no such file or folder")
        if path.is_dir():
            from rewriter.extras import require_image_decoder

            require_image_decoder()


def check_output_suffixes(args: argparse.Namespace, existing: bool = True) -> None:
    """Reports are .json or .md, the plot a .png; `existing=False` leaves paths that exist
    to the later check (after the path-overlap check, which names what they would replace)."""
    for path in args.report or []:
        if (existing or not Path(path).exists()) and \
                Path(path).suffix.lower() not in REPORT_SUFFIXES:
            raise UsageError(f"--report {path}: unknown suffix (write .json or .md)")
    plot = getattr(args, "plot", None)
    if plot is not None and (existing or not Path(plot).exists()) and \
            Path(plot).suffix.lower() != ".png":
        raise UsageError(f"--plot {plot}: the plot is a PNG (write a .png path)")
