"""`rewrite`: run passes in order on a model, with calibration, a numerical guard and a report.

The Python API never prints; progress goes to the optional `log` callback. The output model
records how it was made in `metadata_props` (no timestamps, so output stays deterministic).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from rewriter import runtime
from rewriter.calibration import (
    CalibrationSet,
    data_input_shapes,
    load_calibration,
    model_input_specs,
)
from rewriter.context import PassContext
from rewriter.cost import ModelCost, model_cost
from rewriter.errors import InternalCheckError, ResourceLimitError, UsageError
from rewriter.evidence import (
    few_samples_warning,
    narrow_calibration_warnings,
    split_for_choices,
)
from rewriter.fidelity import task_fidelity
from rewriter.finite import new_nonfinite_tensors, nonfinite_outputs, within
from rewriter.groups import OutputGroup, bind_groups, coerce_groups, format_groups
from rewriter.io import META_SOURCE, load
from rewriter.limits import check_memory, feed_bytes, sample_bytes
from rewriter.options import format_pairs, parse_pairs
from rewriter.progress import set_stage
from rewriter.report import PassReport, RunReport
from rewriter.shapes import with_input_shapes
from rewriter.validate import check_run_arguments

#: An "exact" pass may move outputs by float rounding only; more is a bug.
EXACT_TOLERANCE = 1e-4
#: An exact pass may move outputs by this many machine epsilons of the output dtype (matters
#: for float16, whose epsilon is ~1e-3; float32 stays at EXACT_TOLERANCE).
EXACT_ROUNDING_EPS = 8
#: What `calib` and `evaluate` accept (see `rewrite`).
CalibrationInput = Any

#: Random samples used by the guard when no calibration data is given.
GUARD_RANDOM_SAMPLES = 2


@dataclass
class PassSpec:
    """A pass name and its options, as written `name:key=value,key=value`."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.name}:{format_pairs(self.options)}" if self.options else self.name


def parse_pass_spec(text: str | PassSpec | tuple | Mapping) -> PassSpec:
    """`bottleneck:ratio=0.25,init=whitened` -> PassSpec; lists use `+` (`exclude=a*+b*`).

    The grammar is `rewriter.options` (shared with distill, preprocess and output groups).
    """
    if isinstance(text, PassSpec):
        return text
    if isinstance(text, tuple):
        return PassSpec(text[0], dict(text[1]) if len(text) > 1 else {})
    if isinstance(text, Mapping):
        spec = dict(text)
        name = spec.pop("name", None)
        if not name:
            raise UsageError(f"pass entry {text!r} has no name")
        return PassSpec(str(name), spec)
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise UsageError(f"pass {text!r}: missing pass name")
    return PassSpec(name, dict(parse_pairs(rest, f"pass {text!r}")))


@dataclass
class RewriteResult:
    """The rewritten model (in memory, not yet saved) and what was done to it."""

    model: ir.Model
    report: RunReport
    original: ir.Model
    calibration: CalibrationSet | None = None
    holdout: CalibrationSet | None = None
    #: One message per pass whose output the numerical guard discarded (a bug in that pass:
    #: the model went on without it). The CLI writes nothing and exits 1 when this is not empty.
    discarded: list[str] = field(default_factory=list)
    #: Input shapes used for analysis and benchmarks (given, or read off the calibration data).
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def rewrite(
    model: ir.Model | str | os.PathLike,
    passes: Sequence[str | PassSpec | tuple | Mapping],
    *,
    calib: CalibrationInput | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    preprocess: str | Mapping[str, Any] | None = None,
    holdout: float = 0.25,
    seed: int = 0,
    guard: bool = True,
    log: Callable[[str], None] | None = None,
    distill: Mapping[str, Any] | str | None = None,
    evaluate: CalibrationInput | None = None,
    groups: str | Sequence[str | OutputGroup] | None = None,
    metric: Any = None,
    max_drop: float | None = None,
    min_samples: int | None = None,
) -> RewriteResult:
    """Run `passes` in order on `model` (changed in place and returned in the result).

    Every argument is checked before any data is read or a pass runs; a mistake raises
    `UsageError` (an `OptionError` for a misspelt or out-of-range option) naming the argument.

    Args:
        model: an `onnx_ir.Model` (from `rewriter.load`) or a path to an `.onnx` file.
        passes: each a string in the one `key=value` grammar, `"name"` or
            `"name:key=value,key=value"`, with list values joined by `+`
            (`"bottleneck:target=0.5,init=refit,exclude=head*+stem*"`); or a `PassSpec`, a
            `(name, {options})` tuple, or a mapping `{"name": ..., **options}` whose values are
            typed (`{"name": "bottleneck", "ratio": 0.25, "exclude": ["head*"]}`).
            `rewrite --list-passes` shows every pass with its options and defaults.
        calib: calibration samples, in any of these forms: a path to a `.npz` (input name ->
            array, first axis = samples, optional `labels`), a `.npy` (single-input models), a
            folder of images (see `preprocess`), the string `"random"` (synthetic: a smoke test,
            never evidence of fidelity), a mapping `{input name: array}`, a `CalibrationSet`,
            an iterator or generator of input dicts (`{name: array}` per batch or per sample),
            or an onnxruntime `CalibrationDataReader` (its `get_next()` is read until None).
            Iterators are consumed once, batch by batch.
        input_shapes: fixed dims for analysis and benchmarks only (`{"x": (1, 3, 224, 224)}`);
            dynamic dims are otherwise read off the calibration data. Never frozen in the model.
        preprocess: for image folders, `"size=224,mean=0.485+0.456+0.406,std=..."` or a
            mapping with the same keys (`rewriter.images.PreprocessOptions`).
        holdout: share of calibration samples (in (0, 1)) held out to measure fidelity; the
            rest fits the data-aware passes.
        seed: seed (>= 0) for the split, random data and training; same seed, same bytes.
        guard: after each pass, run the model on held-out (or a few random) inputs and discard
            the pass's result when it moved the outputs beyond its own declared bound (an exact
            pass: float rounding). Discarded passes are listed in `RewriteResult.discarded`.
        log: called with progress messages (the API never prints).
        distill: options such as `{"steps": 500, "lr": 1e-3}` or `"steps=500,lr=1e-3"` (or
            `{}` for defaults): afterwards, train the weights the passes created against the
            original's outputs (needs the `finetune` extra, torch).
        evaluate: data to measure fidelity on (same forms as `calib`, e.g. a labelled test
            set); without it, the held-out part of the calibration data is used.
        groups: `"output0:box=0-3+cls=4-13"` (the same grammar) or a list of `OutputGroup`:
            overrides the automatic output groups fidelity is judged by.
        metric: `"module:function"`, `"file.py:function"` or a callable taking a model path;
            evaluated on the original once and on the rewritten model, and drives
            `target=auto` with `max_drop` as its limit.
        max_drop: the largest drop of `metric` that `target=auto` may accept.
        min_samples: the fewest held-out samples a choice may be made on (default 16).
        When a step chooses on the held-out part (target=auto, a fitted dense head,
        distillation), a third *report* split that no choice saw is carved from the
        calibration data for the headline.

    Returns:
        A `RewriteResult`: the rewritten model (not yet saved; `rewriter.save(result, path)`
        writes it and completes the report), the report, and the untouched original.
    """
    from rewriter.passes import get_pass

    log = log or (lambda message: None)
    shapes = {k: tuple(v) for k, v in (input_shapes or {}).items()}
    specs = [parse_pass_spec(p) for p in passes]
    pass_types = [get_pass(s.name) for s in specs]  # unknown names fail before any work
    pass_options = [t.parse(s.options) for s, t in zip(specs, pass_types, strict=True)]
    distill_options = _parse_distill(distill)
    check_run_arguments(holdout=holdout, seed=seed)
    if preprocess is not None:
        from rewriter.images import parse_preprocess

        parse_preprocess(preprocess)
    _check_last(specs, pass_types, distill is not None)
    given_groups = coerce_groups(groups)  # bad group text fails before any work
    loaded_metric = None
    if metric is not None:
        from rewriter.usermetric import load_metric

        loaded_metric = load_metric(metric)
    if not isinstance(model, ir.Model):
        model = load(model)
    context = PassContext(input_shapes=shapes, seed=seed, log=log, max_drop=max_drop)
    if min_samples is not None:
        context.min_samples = int(min_samples)
    instances = [t(o, context) for o, t in zip(pass_options, pass_types, strict=True)]

    data = None
    if calib is not None:
        data = load_calibration(calib, model, input_shapes=shapes, preprocess=preprocess, seed=seed)
        shapes = {**data_input_shapes(model, data), **shapes}  # dynamic dims read off the data

    original = model.clone()
    report = RunReport(model=model.meta.get(META_SOURCE))
    report.options = {
        "passes": [str(s) for s in specs],
        "calib": None
        if calib is None or not isinstance(calib, (str, os.PathLike))
        else str(calib),
        "input_shapes": {k: list(v) for k, v in shapes.items()},
        "holdout": holdout,
        "seed": seed,
    }
    report.warnings.extend(model.meta.get("onexone.warnings") or [])
    before = analysis_cost(model, shapes)
    report.macs_before, report.params_before = before.macs, before.params
    report.macs_unknown_nodes = len(before.unknown)

    context.input_shapes = shapes
    report_split: CalibrationSet | None = None
    chooses = distill is not None or any(p.chooses_on_holdout() for p in instances)
    if data is not None:
        context.fit, context.holdout = data.split(holdout, seed)
        if chooses and evaluate is None and data.n >= 3:
            context.fit, context.holdout, report_split = split_for_choices(data, holdout, seed)
        if data.synthetic:
            report.warnings.append(
                "calibration data is random: data-aware results mean little, "
                "fidelity is a smoke test"
            )
        parts = f"{context.fit.n} fit, {context.holdout.n} held out"
        if report_split is not None:
            parts = f"{context.fit.n} fit, {context.holdout.n} select, {report_split.n} report"
        log(f"calibration: {data.n} samples from {data.source} ({parts})")

    guard_inputs = _guard_inputs(model, context, shapes, seed) if guard else None
    if guard and guard_inputs is None:
        report.warnings.append(
            "numerical guard off: an input has dynamic dims or is not numeric; give "
            "--input-shape NAME:D1,... "
            "or --calib so each pass is checked in onnxruntime"
        )
    reference = _guard_reference(model, guard_inputs, report)
    original_outputs = reference if guard_inputs is _holdout_inputs(context) else None
    if reference is not None:
        numeric = {k: v for k, v in reference.items() if _is_numeric(v)}  # strings: no groups
        context.groups = bind_groups(given_groups, numeric)
        report.options["groups"] = format_groups(context.groups) or None
        log("output groups: " + "; ".join(g.describe() for g in context.groups))
    else:
        context.groups = list(given_groups)
    if data is not None:
        held_reference = reference if context.holdout is not None else None
        report.warnings.extend(narrow_calibration_warnings(data, held_reference, seed))
        if loaded_metric is None:
            report.warnings.extend(reordered_output_warnings(model))
    if loaded_metric is not None:
        context.metric = loaded_metric
        log(f"metric {loaded_metric.spec}: evaluating the original")
        context.metric_baseline = loaded_metric.evaluate_model(original)
    discarded: list[str] = []
    for number, (spec, instance) in enumerate(zip(specs, instances, strict=True), 1):
        set_stage(f"pass {number}/{len(specs)} {spec.name}")
        log(f"pass {spec}")
        snapshot = model.clone() if guard else None  # tensors are shared
        context.before = snapshot if reference is not None else None  # facts a pass may reuse
        context.reference = reference if guard_inputs is _holdout_inputs(context) else None
        instance(model)
        report.passes.append(instance.report)
        if snapshot is None or not instance.report.n_applied:
            continue
        try:
            _check_weights(model, f"pass '{spec.name}'")
            if reference is not None:
                reference = _check_pass(
                    model, instance.report, reference, guard_inputs, context.groups
                )
        except InternalCheckError as exc:
            _restore(model, snapshot)
            instance.report.metrics["discarded"] = True
            instance.report.note(f"output discarded by the numerical guard: {exc}")
            report.warnings.append(f"internal check failed: {exc}")
            discarded.append(str(exc))
            log(f"pass {spec}: {exc}")
    context.before = context.reference = None
    final_outputs = original_outputs is not None and reference
    if distill_options is not None:
        set_stage("distill")
        report.passes.append(_distill(original, model, context, distill_options))
        _check_weights(model, "distillation")
        final_outputs = None
    _record_provenance(model, specs)

    after = analysis_cost(model, shapes)
    report.macs_after, report.params_after = after.macs, after.params
    if evaluate is not None and report.passes:
        eval_data = load_calibration(evaluate, model, input_shapes=shapes, seed=seed)
        report.fidelity = measure_fidelity(original, model, eval_data, context.groups)
        report.fidelity.update(dataset=eval_data.source, split="eval")
    elif report_split is not None and report.passes:
        report.fidelity = measure_fidelity(original, model, report_split, context.groups)
        report.fidelity.update(
            dataset="report split of the calibration data (no choice saw it)", split="report"
        )
    elif context.holdout is not None and report.passes:
        report.fidelity = measure_fidelity(original, model, context.holdout, context.groups,
                                           original_outputs, final_outputs or None)
        report.fidelity.update(dataset="held-out calibration samples", split="holdout")
        if chooses:
            report.warnings.append(
                "a step chose on the held-out samples the fidelity was measured on: the "
                "figures are optimistic (give --eval data)"
            )
    if report.fidelity is not None:
        warning = few_samples_warning(report.fidelity.get("samples"), report.fidelity["dataset"])
        if warning:
            report.warnings.append(warning)
    else:
        warning = unmeasured_warning(report.passes)
        if warning:
            report.warnings.append(warning)
    if loaded_metric is not None and context.metric_baseline is not None:
        from rewriter.usermetric import metric_summary

        after = loaded_metric.evaluate_model(model) if report.passes else None
        report.metric = metric_summary(loaded_metric, context.metric_baseline, after)
    return RewriteResult(model, report, original, context.fit, context.holdout, discarded, shapes)


def reordered_output_warnings(model: ir.Model) -> list[str]:
    """Outputs sorted by score (TopK, NMS in the graph: YOLOv10, exports with NMS) swap
    positions when two scores swap, so per-position fidelity overstates what changed."""
    from rewriter.graph import reordered_outputs

    return [f"output '{name}' comes after {op}, so its rows are ordered by score: two scores "
            "that swap move whole detections between positions, and per-position fidelity (what "
            "sensitivity, target=auto and gates read) overstates the change; judge it with "
            "--metric (e.g. examples/detector_metric.py)"
            for name, op in reordered_outputs(model).items()]


def unmeasured_warning(passes: Sequence[PassReport]) -> str | None:
    """Say so when a lossy pass changed the model and nothing measured what it cost: without
    data the run still writes a model, and silence would read as "it survived"."""
    lossy = [p for p in passes if p.n_applied and not p.exact and not p.metrics.get("discarded")]
    if not lossy:
        return None
    moved = [p.metrics.get("guard_rel_l2") for p in lossy]
    moved = [m for m in moved if isinstance(m, (int, float))]
    seen = (f" (on random inputs the outputs moved by rel L2 up to {max(moved):.3g}, which says "
            "nothing about the task)") if moved else ""
    names = ", ".join(dict.fromkeys(p.name for p in lossy))
    return (f"accuracy not measured: {names} changed the outputs and no calibration data was "
            f"given{seen}; give --calib with a few hundred of the model's real inputs (an image "
            "folder works) to fit the new weights to them and measure the result, or --eval")


def _check_last(specs: Sequence[PassSpec], pass_types: Sequence[type], distill: bool) -> None:
    """A pass that must run last (quantize) refuses a pass or distillation after it."""
    for i, pass_type in enumerate(pass_types):
        if not getattr(pass_type, "runs_last", False):
            continue
        if i + 1 < len(specs):
            raise UsageError(f"pass '{specs[i].name}' must run last: '{specs[i + 1].name}' "
                             f"follows it (put {specs[i].name} at the end of the pipeline)")
        if distill:
            raise UsageError(f"pass '{specs[i].name}' must run last: distillation cannot "
                             "follow it (drop --distill or the quantize pass)")


def analysis_cost(
    model: ir.Model, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> ModelCost:
    """Model cost on a copy with dynamic input dims fixed (batch 1 unless given)."""
    return model_cost(with_input_shapes(model, input_shapes or {}))


def measure_fidelity(
    original: ir.Model,
    rewritten: ir.Model,
    data: CalibrationSet,
    groups: Sequence[OutputGroup] | None = None,
    reference: Mapping[str, np.ndarray] | None = None,
    candidate: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Per-group fidelity of `rewritten` against `original` on `data` (held-out samples);
    outputs the run already computed on `data` may be passed instead of recomputed."""
    ref = reference if reference is not None else runtime.run_all(original, data.inputs)
    got = candidate if candidate is not None else runtime.run_all(rewritten, data.inputs)
    bad = nonfinite_outputs(ref, got)
    if bad:
        name, count = bad[0]
        raise InternalCheckError(
            f"the rewritten model's output '{name}' has {count} NaN/inf values on {data.source} "
            "where the input model's are finite; nothing written"
        )
    for name in [k for k, v in ref.items() if not _is_numeric(v)]:
        if not np.array_equal(ref[name], got[name]):
            raise InternalCheckError(f"the rewritten model changed non-numeric output '{name}' "
                                     f"on {data.source}; nothing written")
    ref, got, groups = _numeric_only(ref, got, groups)
    result = task_fidelity(_finite_view(ref), _finite_view(got, ref), groups, data.labels)
    result["samples"] = data.n
    result["synthetic"] = data.synthetic
    return result


def _holdout_inputs(context: PassContext) -> dict[str, np.ndarray] | None:
    return context.holdout.inputs if context.holdout is not None else None


def _guard_inputs(
    model: ir.Model, context: PassContext, shapes: Mapping[str, tuple[int, ...]], seed: int
) -> dict[str, np.ndarray] | None:
    """Held-out samples when given, else a few seeded random ones when input shapes are static."""
    if context.holdout is not None:
        return context.holdout.inputs
    rng = np.random.default_rng(seed + 1)
    wanted = {}
    for s in model_input_specs(model):
        dims = list(shapes.get(s.name) or s.shape)
        if dims and dims[0] is None:
            dims[0] = 1
        if any(d is None for d in dims) or s.dtype.kind not in "biuf":
            return None
        wanted[s.name] = ([GUARD_RANDOM_SAMPLES, *dims[1:]] if dims else dims, s.dtype)
    check_memory(
        feed_bytes({k: d for k, (d, _) in wanted.items()}, {k: t for k, (_, t) in wanted.items()})
        + GUARD_RANDOM_SAMPLES * sample_bytes(model),
        f"the numerical guard's {GUARD_RANDOM_SAMPLES} random samples",
    )
    return {k: _random_feed(rng, d, t) for k, (d, t) in wanted.items()}


def _random_feed(rng: np.random.Generator, dims: list[int], dtype: np.dtype) -> np.ndarray:
    """Normal floats; 0/1 for integer and bool inputs (valid as indices, masks and flags)."""
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(dims, dtype=np.float32).astype(dtype)
    return rng.integers(0, 2, dims).astype(dtype)


def _guard_reference(
    model: ir.Model, inputs: dict[str, np.ndarray] | None, report: RunReport
) -> dict[str, np.ndarray] | None:
    """Outputs of the input model, or None (guard off, with a warning) when it cannot run."""
    if not inputs:
        return None
    try:
        return runtime.run_all(model, inputs)
    except ResourceLimitError:
        raise
    except Exception as exc:  # custom ops onnxruntime lacks, or inputs it rejects
        message = " ".join(str(exc).split())[:300]
        report.warnings.append(f"numerical guard off: the input model does not run ({message})")
        return None


def _restore(model: ir.Model, snapshot: ir.Model) -> None:
    """Put the snapshot's graph, functions and metadata back into `model` (kept in place, so
    callers holding `model` see the restored graph)."""
    model.graph = snapshot.graph
    model.functions.clear()
    model.functions.update(snapshot.functions)
    model.metadata_props.clear()
    model.metadata_props.update(snapshot.metadata_props)


def exact_tolerance(outputs: Iterable[np.ndarray]) -> float:
    """Rel L2 an exact pass may move outputs by: float rounding, so it scales with the least
    precise float output (float16 weights re-rounded after a float32 fold move outputs ~1e-3)."""
    eps = [float(np.finfo(a.dtype).eps) for a in outputs if np.issubdtype(a.dtype, np.floating)]
    return max([EXACT_TOLERANCE, *(EXACT_ROUNDING_EPS * e for e in eps)])


def _check_pass(
    model: ir.Model,
    report: PassReport,
    reference: dict[str, np.ndarray],
    inputs: dict[str, np.ndarray],
    groups: Sequence[OutputGroup] = (),
) -> dict[str, np.ndarray]:
    """Fail loudly when a pass moved any output group beyond its own declared bound."""
    try:
        outputs = runtime.run_all(model, inputs)
    except ResourceLimitError:
        raise
    except Exception as exc:  # session creation raises OnexoneError, a failed run ORT's own
        message = " ".join(str(exc).split())[:300]
        raise InternalCheckError(
            f"pass '{report.name}' produced a model onnxruntime cannot run: {message}"
        ) from None
    bound = exact_tolerance(reference.values()) if report.exact else report.error_bound
    for name, ref in reference.items():
        got = outputs[name]
        if ref.shape != got.shape:
            raise InternalCheckError(
                f"pass '{report.name}' changed output '{name}' shape {ref.shape} -> {got.shape}"
            )
        if not _is_numeric(ref):  # strings, ...: a rewrite must leave them exactly as they were
            if not np.array_equal(ref, got):
                raise InternalCheckError(f"pass '{report.name}' changed non-numeric output "
                                         f"'{name}'; its output is discarded")
    bad = nonfinite_outputs(reference, outputs)
    if bad:
        raise InternalCheckError(
            f"pass '{report.name}' made output '{bad[0][0]}' NaN/inf at {bad[0][1]} positions "
            "where the input model's is finite; its output is discarded"
        )
    numeric_ref, numeric_got, numeric_groups = _numeric_only(reference, outputs, groups)
    fidelity = task_fidelity(_finite_view(numeric_ref), _finite_view(numeric_got, numeric_ref),
                             numeric_groups)
    worst = max(fidelity["groups"].items(), key=lambda kv: kv[1]["rel_l2"], default=None)
    report.metrics["guard_rel_l2"] = worst[1]["rel_l2"] if worst else None
    if bound is not None and worst is not None and not within(worst[1]["rel_l2"], bound):
        raise InternalCheckError(
            f"pass '{report.name}' declared output error <= {bound:g} but moved output group "
            f"{worst[0]} by rel L2 {worst[1]['rel_l2']:.3g}; its output is discarded"
        )
    return outputs


def _finite_view(
    outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Outputs with the positions where the input model's own output is NaN/inf set to 0, so
    per-group metrics compare what both models compute (new NaN/inf is refused before this)."""
    out = {}
    for name, array in outputs.items():
        ref = array if reference is None else reference[name]
        if np.issubdtype(np.asarray(ref).dtype, np.floating) and not np.all(np.isfinite(ref)):
            array = np.where(np.isfinite(ref), array, 0.0).astype(np.asarray(array).dtype)
        out[name] = array
    return out


def _is_numeric(array: np.ndarray) -> bool:
    return np.asarray(array).dtype.kind in "biuf"


def _numeric_only(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    groups: Sequence[OutputGroup] | None,
) -> tuple[dict, dict, list[OutputGroup] | None]:
    """Outputs (and groups over them) that hold numbers: strings are compared for equality."""
    keep = [k for k, v in reference.items() if _is_numeric(v)]
    kept_groups = None if groups is None else [g for g in groups if g.output in keep]
    return ({k: reference[k] for k in keep}, {k: candidate[k] for k in keep}, kept_groups)


def _check_weights(model: ir.Model, who: str) -> None:
    """Tensors a step created must be finite (NaN weights would ship silently otherwise)."""
    bad = new_nonfinite_tensors(model)
    if bad:
        where, count = bad[0]
        raise InternalCheckError(f"{who} wrote {count} NaN/inf values into {where}; "
                                 "that result is refused")


def _distill(
    original: ir.Model, model: ir.Model, context: PassContext, options: Mapping[str, Any] | str
) -> PassReport:
    """The distillation step, with fidelity on held-out samples before and after it."""
    from rewriter.distill import distill, parse_distill_options

    parsed = parse_distill_options(options)  # bad options fail before any work
    groups = context.groups
    before = measure_fidelity(original, model, context.holdout, groups) if context.holdout else None
    step = distill(
        original, model, context.fit, context.holdout, parsed, seed=context.seed, log=context.log,
        groups=groups,
    )
    if before is not None:
        step.metrics["fidelity_before"] = before
        step.metrics["fidelity_after"] = measure_fidelity(original, model, context.holdout, groups)
    return step


def _parse_distill(distill: Mapping[str, Any] | str | None) -> Any:
    """Distillation options parsed before any work; torch checked the same way."""
    if distill is None:
        return None
    from rewriter.distill import parse_distill_options
    from rewriter.extras import require

    parsed = parse_distill_options(distill)
    require("torch", "finetune", "distillation")
    return parsed


def _record_provenance(model: ir.Model, specs: Sequence[PassSpec]) -> None:
    from rewriter import __version__

    model.metadata_props["onexone.version"] = __version__
    model.metadata_props["onexone.passes"] = " ".join(str(s) for s in specs)
