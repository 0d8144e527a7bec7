"""What every low-rank pass shares: its options, and the run select → plan → fit → emit →
measure over the modules `rewriter.lowrank_select`, `_plan`, `_fit`, `_emit`, `_measure`.

A low-rank pass (`bottleneck`, `spatial-svd`) is its options plus the list of methods
(`rewriter.lowrank_methods`) it may use per layer; `run_lowrank` does the rest, with every
intermediate result a plain value passed from one step to the next.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import onnx_ir as ir
from rewriter.passes.base import PassOptions, option

from rewriter import conv_timing, lowrank, runtime
from rewriter.context import PassContext
from rewriter.downstream import cut_macs
from rewriter.errors import PassError
from rewriter.evidence import check_evidence
from rewriter.fidelity import judge_candidate, measured_groups, task_error
from rewriter.graph import Namer
from rewriter.lowrank_allocate import (
    MISJUDGED,
    back_off,
    measured_choices,
    measured_grid,
    predicted_error,
)
from rewriter.lowrank_emit import emit
from rewriter.lowrank_fit import FitSettings, fit_and_emit, spectra, start_factors
from rewriter.lowrank_measure import (
    conv_output_errors,
    record_applied,
    record_skips,
    record_timing_totals,
    record_totals,
)
from rewriter.lowrank_methods import Method
from rewriter.lowrank_plan import (
    DEFAULT_ROUND,
    Plan,
    RankRule,
    auto_cut,
    drop_slower,
    drop_unprofitable,
    layer_choices,
    plan_by_rule,
    plan_for_target,
    spectral_estimate,
    timed_choices,
)
from rewriter.lowrank_select import DEFAULT_MIN_CHANNELS, ConvLayer, SelectRules, Skip, select_convs
from rewriter.lowrank_sensitivity import (
    rewritten_outputs,
    single_layer_errors,
    sweep_samples,
    sweep_subset,
)
from rewriter.report import PassReport

#: Without a named rank rule: the most task error a layer may cost per share of the model's MACs
#: it saves (the whole 0.01 fidelity budget must buy at least 10% of the MACs).
DEFAULT_MAX_COST_PER_SAVING = 0.1
#: A fixed target whose measured task error exceeds target=auto's floor this many times over
#: gets a warning in the report.
COSTLY_TARGET = 5.0
#: A single-layer error under this share of target=auto's floor is negligible: a method whose
#: most-saving rank costs that little is not measured at its larger ranks (forty such layers
#: together stay under half the floor).
NEGLIGIBLE_SHARE = 0.01


@dataclass
class LowRankOptions(PassOptions):
    ratio: float | None = option(None, "rank as a share of the full rank (0.5 when no other "
                                       "rank option is given)")
    rank: int | None = option(None, "fixed rank for every layer")
    energy: float | None = option(None, "keep this share of the (whitened) squared spectrum")
    target: float | Literal["auto"] | None = option(
        None, "remove this share of the whole model's MACs (allocated by least error per MAC "
              "saved), or 'auto': the largest cut whose held-out task error (worst output "
              "group) stays <= 1 - min-cosine, or whose --metric drop stays <= --max-drop")
    min_cosine: float = option(0.99, "fidelity floor for target=auto: every output group's "
                                     "cosine, rel L2 and score flips (see README Fidelity)",
                               le=1)
    init: Literal["auto", "svd", "whitened", "refit"] = option(
        "auto", "factor init: refit with --calib, svd without")
    round: int = option(DEFAULT_ROUND, "round ranks to a multiple of this (1: no rounding)")
    min_channels: int = option(DEFAULT_MIN_CHANNELS, "skip convs with fewer input channels")
    min_macs: float = option(0.0, "skip convs below this share of the model's MACs", le=1)
    include: list[str] = option([], "only node names matching these globs (a+b)")
    exclude: list[str] = option([], "never node names matching these globs (a+b)")
    shrink: float = option(lowrank.DEFAULT_SHRINK, "covariance shrinkage toward the diagonal",
                           le=1)
    ridge: float = option(lowrank.DEFAULT_RIDGE, "refit ridge, relative to the mean diagonal")
    max_positions: int = option(4096, "refit: output positions sampled per calibration batch",
                                ge=1)
    sensitivity: bool = option(True, "with --calib: measure each layer's effect on the output")
    auto_steps: int = option(6, "bisection steps for target=auto", ge=1)
    allocate: Literal["auto", "spectrum", "measured"] = option(
        "auto", "what a target allocates on: spectrum (predicted errors) or measured (each "
                "layer rewritten alone over a rank grid, task error on held-out data, cached); "
                "auto: measured for method=auto with --calib, else spectrum")
    measure_ranks: int = option(4, "allocate=measured: ranks measured per layer and method",
                                ge=1)
    measure_samples: int | None = option(
        None, "allocate=measured: held-out samples each sensitivity trial runs on (default: all "
              "that fit a 2e12-MAC sweep, at least min-samples)", ge=1)
    max_layer_error: float | None = option(
        None, "allocate=measured: no layer at a rank whose measured task error exceeds this",
        ge=0)
    max_error: float | None = option(
        None, "target=auto: keep the held-out task error <= this (instead of min-cosine)", ge=0)
    backoff_steps: int = option(4, "allocate=measured: rank steps backed off when the whole "
                                   "model is worse than the per-layer errors predict", ge=0)
    min_samples: int | None = option(None, "target=auto: fewest held-out samples to choose on "
                                           "(default --min-samples, 16)")
    pointwise: bool | None = option(
        None, "also factor 1x1 convs of at least 0.5% of the MACs into two narrower 1x1s "
              "(C -> r -> O, saving where r < C·O/(C+O)); default on where a target allocates "
              "on measured errors (method=auto), else off")
    max_cost_per_saving: float | None = option(
        None, "with --calib and no target: leave alone a layer whose measured task error per "
              "share of the model's MACs it saves exceeds this (default 0.1 when no ratio, "
              "rank or energy is named, else off; 0: keep every layer)", ge=0)

    def cost_cap(self) -> float:
        """The payoff rule in force: an explicit rank rule is the user's call, kept as asked."""
        if self.max_cost_per_saving is not None:
            return self.max_cost_per_saving
        named = any(getattr(self, n) is not None for n in ("ratio", "rank", "energy"))
        return 0.0 if named else DEFAULT_MAX_COST_PER_SAVING

    def validate(self) -> None:
        given = [n for n in ("ratio", "rank", "energy", "target") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of ratio, rank, energy, target (got {', '.join(given)})")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise ValueError("ratio must be in (0, 1)")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError("energy must be in (0, 1]")
        if isinstance(self.target, float) and not 0 < self.target < 1:
            raise ValueError("target must be in (0, 1) or 'auto'")
        if self.rank is not None and self.rank < 1:
            raise ValueError("rank must be >= 1")
        if self.round < 1:
            raise ValueError("round must be >= 1")
        if self.measure_ranks < 1:
            raise ValueError("measure-ranks must be >= 1")
        for name in ("max_layer_error", "max_error"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be > 0")


@dataclass(frozen=True)
class Timing:
    """objective=latency settings (bottleneck only): time layers instead of counting MACs."""

    threads: int = 1
    min_gain: float = 0.05
    grid: int = 6


def select_rules(opts: LowRankOptions, pointwise: bool = False) -> SelectRules:
    """The candidate rules a low-rank pass's options name (include/exclude, size floors);
    `pointwise`: the resolved `pointwise` option (`pointwise_on`)."""
    return SelectRules(tuple(opts.include), tuple(opts.exclude), opts.min_channels,
                       opts.min_macs, pointwise)


def pointwise_on(opts: LowRankOptions, measured: bool) -> bool:
    """1x1 convs are candidates where the user says so, else where allocation is measured:
    only a measured error tells a 1x1 that factors well from one that does not (a 1x1 must
    drop to under half its rank to save anything), so no rank rule applies them blindly."""
    return opts.pointwise if opts.pointwise is not None else measured


def measures_on_holdout(opts: LowRankOptions, n_methods: int) -> bool:
    """Whether the pass chooses on the held-out split (target=auto, measured allocation)."""
    measured = opts.allocate == "measured" or (opts.allocate == "auto" and n_methods > 1)
    return opts.target == "auto" or (opts.target is not None and measured)


def resolve_init(init: str, context: PassContext, report: PassReport, pass_name: str) -> str:
    if init == "auto":
        if context.has_data:
            return "refit"
        report.note("init=svd: no calibration data given; data-aware inits "
                    "(whitened, refit) need --calib and are more accurate")
        return "svd"
    if init != "svd" and not context.has_data:
        raise PassError(f"{pass_name}: init={init} needs calibration data (--calib)")
    if init != "svd" and context.synthetic:
        report.note(f"init={init} on random calibration data: the factors are only as "
                    "good as the data")
    return init


def usable_layers(layers: Sequence[ConvLayer], methods: Sequence[Method]
                  ) -> tuple[list[ConvLayer], list[Skip]]:
    """Layers at least one method applies to; the others with the first method's reason."""
    kept, skipped = [], []
    for layer in layers:
        reasons = [m.refusal(layer) for m in methods]
        if any(r is None for r in reasons):
            kept.append(layer)
        else:
            skipped.append(Skip(layer.name, reasons[0], layer.index))
    return kept, skipped


def run_lowrank(model: ir.Model, opts: LowRankOptions, context: PassContext,
                report: PassReport, pass_name: str, methods: Sequence[Method], what: str,
                mode: str, merge: bool = True, refit_reduce: int = 1,
                timing: Timing | None = None) -> None:
    """Select, plan, fit, emit and measure; every decision goes to `report`."""
    init = resolve_init(opts.init, context, report, pass_name)
    if opts.target == "auto" and not context.has_data:
        raise PassError(f"{pass_name}: target=auto needs calibration data (--calib)")
    if opts.target == "auto":
        check_evidence(context, f"{pass_name}: target=auto", opts.min_samples)
    if len(methods) > 1 and opts.target is None:
        raise PassError(f"{pass_name}: method=auto chooses per layer against a global budget: "
                        "give target=<share> or target=auto")
    nothing = f"nothing to do: no conv where {what} " + (
        "saves MACs" if timing is None else "is measured faster in onnxruntime")
    original = context.before if context.before is not None else model.clone()
    measured = _allocate_measured(opts, methods, context, timing is not None)
    selection = select_convs(model, select_rules(opts, pointwise_on(opts, measured)),
                             context.input_shapes)
    layers, refused = usable_layers(selection.layers, methods)
    selection.skipped.extend(refused)
    selection.layers = layers
    if not layers:
        record_skips(report, selection)
        if opts.target is not None:
            report.note(unreachable_target(opts.target, selection.skipped))
        report.note(f"{nothing}; model unchanged")
        return
    settings = FitSettings(opts.shrink, opts.ridge, opts.max_positions, refit_reduce)
    spec = spectra(original, layers, methods, init, context, settings)
    estimate = spectral_estimate(spec)
    timer = conv_timing.ConvTimer(threads=timing.threads) if timing is not None else None
    budget: float = selection.total_macs
    if timer is not None and opts.target is not None:
        budget = _model_ms(original, context, layers, timing, report)
    unit = "MACs" if timer is None else "measured time"
    reference = context.holdout_reference(original) if context.holdout is not None else None
    groups = context.groups or None

    bound = measured_groups(reference, groups) if reference is not None else None
    # what single-layer trials run on: the held-out split, or a subset of it (`_sweep_data`)
    sweep_inputs = context.holdout.inputs if reference is not None else None
    sweep_reference = reference

    def metric(ref, got) -> float:  # the worst group's task error, flips counted smoothly
        if bound is not None and (ref is reference or ref is sweep_reference):
            return task_error(ref, got, bound, prebound=True, smooth=True)
        return task_error(ref, got, groups, smooth=True)

    metric_key = repr(groups)

    def emit_trial(m: ir.Model, node: ir.Node, layer: ConvLayer, f, namer: Namer) -> object:
        return emit(m, node, layer, f, namer, merge)

    def start(layer: ConvLayer, rank) -> object:
        return start_factors(layer, spec, rank)

    layer_of = {x.index: x for x in layers}

    def alone(ranks: dict) -> dict:
        """Per layer index: the held-out task error with only that layer rewritten (cached)."""
        got = single_layer_errors(original, [layer_of[i] for i in ranks],
                                  {i: [r] for i, r in ranks.items()}, start, sweep_inputs,
                                  sweep_reference, emit_trial, init, metric, metric_key,
                                  context.log)
        return {i: e for (i, _), e in got.items()}

    errors: dict = {}
    grid: dict = {}
    slow_reasons: dict[int, str] = {}
    if measured:
        grid = measured_grid(layers, methods, opts.round, estimate, opts.measure_ranks)
        sweep_inputs, sweep_reference = _sweep_data(opts, context, reference, selection,
                                                    grid, report)
        errors = single_layer_errors(original, layers, grid, start, sweep_inputs,
                                     sweep_reference, emit_trial, init, metric, metric_key,
                                     context.log, NEGLIGIBLE_SHARE * task_floor(opts))
        report.metrics["allocation"] = "measured"
        report.metrics["sensitivity_trials"] = len(errors)

    def choices() -> list[lowrank.LayerChoices]:
        if measured:
            out, capped = measured_choices(layers, methods, grid, errors, opts.max_layer_error)
            slow_reasons.update(capped)
            return out
        out = []
        for layer in layers:
            usable = [m for m in methods if m.refusal(layer) is None]
            if timer is None:
                out.append(layer_choices(layer, usable, opts.round, estimate))
                continue
            ranks = layer_choices(layer, usable, opts.round, estimate).ranks
            kept, gains, reason = timed_choices(layer, ranks, timer, timing.min_gain,
                                                timing.grid)
            if reason is not None:
                slow_reasons[layer.index] = reason
            out.append(layer_choices(layer, usable, opts.round, estimate, kept, gains))
        return out

    def rewrite_into(target: ir.Model, ranks: dict) -> dict:
        nodes, namer = list(target.graph), Namer(target)
        return fit_and_emit(target, original, layers, ranks, spec, init, context, settings,
                            lambda layer, f: emit(target, nodes[layer.index], layer, f, namer,
                                                  merge))

    if opts.target == "auto":

        def accept(plan: Plan) -> bool:
            trial = original.clone()
            rewrite_into(trial, plan.ranks)
            if opts.max_error is not None:
                got = runtime.run_all(trial, context.holdout.inputs)
                return metric(reference, got) <= opts.max_error
            verdict = judge_candidate(trial, reference, context, opts.min_cosine)
            context.log(f"{pass_name} auto: {verdict.detail}")
            return verdict.ok

        plan, cut = auto_cut(choices(), budget, opts.auto_steps, accept, context.log)
        report.metrics["auto_target"] = cut
        if opts.max_error is not None:
            floor = f"the worst output group's task error <= {opts.max_error:g}"
        elif context.metric is not None:
            floor = "the metric's drop <= max-drop"
        else:
            floor = f"every output group's task error <= {1 - opts.min_cosine:.3g}"
        report.note(f"target=auto: {cut:.1%} of the {unit} removed keeps {floor} on "
                    f"{context.holdout.n} held-out samples")
    elif opts.target is not None:
        layer_choices_now = choices()
        plan = plan_for_target(layer_choices_now, budget, opts.target, unit)
        if measured and opts.max_layer_error is not None and plan.notes:
            plan.notes.append(f"stopped at what max-layer-error {opts.max_layer_error:g} "
                              "allows per layer")
        if measured and plan.ranks:

            def whole(p: Plan) -> float:
                """The plan's held-out task error with the start factors (one run); where that
                looks misjudged and the fit is refit, as refit would emit it (a copy refit:
                it often recovers what the start factors lose, and then nothing backs off)."""
                rewrites = [(x, start(x, p.ranks[x.index])) for x in layers
                            if x.index in p.ranks]
                error = metric(reference, rewritten_outputs(
                    original, rewrites, context.holdout.inputs, emit_trial))
                if init != "refit" or error <= MISJUDGED * max(predicted_error(p, errors),
                                                               1e-12):
                    return error
                trial = original.clone()
                rewrite_into(trial, dict(p.ranks))
                return metric(reference, runtime.run_all(trial, context.holdout.inputs))

            plan, _ = back_off(plan, layer_choices_now, errors, whole, opts.backoff_steps,
                               context.log)
            overrun = costly_target(opts, plan.metrics.get("whole_model_error_final"),
                                    context.holdout.n)
            if overrun:
                plan.notes.append(overrun)
    else:
        plan = plan_by_rule(layers, methods[0], spec, RankRule(opts.ratio, opts.rank,
                                                               opts.energy, opts.round))
        if timer is not None:
            plan = drop_slower(layers, plan, timer, timing.min_gain)
        if context.holdout is not None and opts.sensitivity and opts.cost_cap() > 0:
            saved = {i: layer_of[i].macs - methods[0].macs_after(layer_of[i], r)
                     for i, r in plan.ranks.items()}
            plan = drop_unprofitable(plan, alone(plan.ranks), saved, selection.total_macs,
                                     opts.cost_cap())
    plan.reasons = {**slow_reasons, **plan.reasons}
    for x in layers:
        if x.index not in plan.ranks and grid.get(x.index):
            plan.details.setdefault(x.index, {}).update(_task_details(x.index, plan, grid,
                                                                      errors))
    for note in plan.notes:
        report.note(note)
    report.metrics.update({k: v for k, v in plan.metrics.items() if k != "planned_saving"})
    record_skips(report, selection, plan)
    if not plan.ranks:
        report.note(f"{nothing}; model unchanged")
        return
    emitted = rewrite_into(model, plan.ranks)
    measured_out = conv_output_errors(model, original, layers, emitted, context)
    sensitivity = {}
    if context.holdout is not None and opts.sensitivity:
        sensitivity = alone(plan.ranks)
    task = {x.index: _task_details(x.index, plan, grid, errors) for x in layers}
    record_applied(report, layers, plan, emitted, spec, measured_out, sensitivity, timer, task)
    fitted = {layer.name: settings.details[layer.index] for layer in layers
              if layer.index in settings.details}
    for decision in report.decisions:  # what each layer's fit used (samples, positions)
        if decision.applied and decision.node in fitted:
            decision.details.update(fitted[decision.node])
    record_totals(report, selection, init, mode)
    if timer is not None:
        record_timing_totals(report, timer, timing.threads,
                             budget if opts.target is not None else None)


def costly_target(opts: LowRankOptions, error: float | None, samples: int) -> str | None:
    """A warning where the planned cut costs the task far more than target=auto would allow:
    a fixed target is the user's call, but the report must say what it costs."""
    floor = task_floor(opts)
    if error is None or error <= COSTLY_TARGET * floor:
        return None
    return (f"target={opts.target:g} costs the task: the worst output group's task error is "
            f"{error:.3g} on {samples} held-out samples, {error / floor:.0f}x the {floor:g} "
            "target=auto keeps; this model does not take this cut without training "
            "(target=auto finds the largest cut within it, --distill may recover it)")


def task_floor(opts: LowRankOptions) -> float:
    """The whole-model task error target=auto keeps (max-error, else 1 - min-cosine)."""
    return opts.max_error if opts.max_error is not None else 1 - opts.min_cosine


def unreachable_target(target: float | str, skipped: Sequence[Skip]) -> str:
    """Why a target gets nothing: every conv was refused, counted by reason (a MobileNet-style
    model is all pointwise and depthwise convs, which no low-rank method here factors)."""
    reasons = Counter(skip.reason for skip in skipped)
    why = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common()) or "no convs"
    return f"target={target} is out of reach: no conv this pass can factor ({why})"


def _allocate_measured(opts: LowRankOptions, methods: Sequence[Method], context: PassContext,
                       timed: bool) -> bool:
    """Whether a target allocates on measured per-layer errors (see the `allocate` option)."""
    if opts.target is None or opts.allocate == "spectrum":
        return False
    if opts.allocate == "auto" and len(methods) == 1:
        return False
    if context.holdout is None or not context.holdout.n:
        if opts.allocate == "measured":
            raise PassError("allocate=measured needs held-out calibration data (--calib)")
        return False
    if timed:
        raise PassError("allocate=measured ranks by MACs; it does not combine with "
                        "objective=latency")
    return True


def _sweep_data(opts: LowRankOptions, context: PassContext, reference: dict,
                selection, grid: dict, report: PassReport) -> tuple[dict, dict]:
    """The held-out inputs and reference a sensitivity sweep measures on: all of them, or a
    spread subset where trials x cut MACs x samples would pass `SWEEP_MACS` (report says)."""
    held_out = context.holdout.n
    below = cut_macs(selection.analysis, list(grid))
    per_sample = float(sum(len(ranks) * below[i] for i, ranks in grid.items()))
    k = sweep_samples(held_out, per_sample, sweep_floor(opts, context), opts.measure_samples)
    report.metrics["sensitivity_samples"] = k
    if k >= held_out:
        return context.holdout.inputs, reference
    report.note(f"sensitivity trials measured on {k} of the {held_out} held-out samples (the "
                f"sweep runs {per_sample / 1e9:.0f} G MACs per sample; measure-samples=N "
                "changes it); the whole-model checks use all of them")
    return sweep_subset(context.holdout.inputs, reference, k)


def sweep_floor(opts: LowRankOptions, context: PassContext) -> int:
    """The fewest held-out samples a sensitivity sweep runs on: min-samples, as target=auto."""
    return opts.min_samples if opts.min_samples is not None else context.min_samples


def _task_details(index: int, plan: Plan, grid: dict, errors: dict) -> dict:
    """Measured task errors of a layer: at its chosen rank and over its grid."""
    if not grid.get(index):
        return {}
    out: dict = {"task_error_grid": {str(rk): errors[(index, rk)] for rk in grid[index]}}
    rank = plan.ranks.get(index)
    if rank is not None and (index, rank) in errors:
        out["task_error"] = errors[(index, rank)]
    return out


def _model_ms(original: ir.Model, context: PassContext, layers: Sequence[ConvLayer],
              timing: Timing, report: PassReport) -> float:
    """The whole model's onnxruntime time: the budget a latency target takes a share of."""
    ms = conv_timing.model_time_ms(original, context.input_shapes, timing.threads,
                                   batch=layers[0].in_shape[0])
    report.metrics["model_ms_before"] = round(ms, 4)
    report.note(f"objective=latency: target is a share of the model's measured "
                f"onnxruntime time ({ms:.2f} ms, {timing.threads} thread(s))")
    return ms
