"""What a low-rank rewrite did, measured: per-layer output errors on held-out data, and the
report rows and totals every low-rank pass writes (so `--dry-run` and the report agree)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from rewriter import conv_timing
from rewriter.context import PassContext
from rewriter.cost import conv_macs
from rewriter.lowrank_emit import Emitted
from rewriter.lowrank_methods import Rank, method_named, spectrum_key
from rewriter.lowrank_plan import Plan, conv_layer_timing
from rewriter.lowrank_select import ConvLayer, Selection
from rewriter.report import PassReport


def conv_output_errors(model: ir.Model, original: ir.Model, layers: Sequence[ConvLayer],
                       emitted: Mapping[int, Emitted], context: PassContext) -> dict[int, float]:
    """Each rewritten conv's output rel L2 against the original's, on the held-out data."""
    if context.holdout is None:
        return {}
    merged = {id(e.merged_value) for e in emitted.values() if e.merged_value is not None}
    names = {}
    for layer in layers:
        info = emitted.get(layer.index)
        # a later layer merged into this output: it is no longer comparable
        if info is not None and id(info.output) not in merged:
            names[layer.index] = info.output.name
    if not names:
        return {}
    errs = {i: [0.0, 0.0] for i in names}
    by_index = {layer.index: layer for layer in layers}
    current = context.capture(model, sorted(set(names.values())), "holdout")
    reference = context.capture(original, sorted({by_index[i].output_name for i in names}),
                                "holdout")
    for got, ref in zip(current, reference, strict=True):
        for i, name in names.items():
            a, b = ref[by_index[i].output_name], got[name]
            if a.shape != b.shape:
                errs[i] = [float("nan"), 1.0]
                continue
            errs[i][0] += float(np.sum((b.astype(np.float64) - a) ** 2))
            errs[i][1] += float(np.sum(a.astype(np.float64) ** 2))
    return {i: math.sqrt(e / n) if n > 0 else 0.0 for i, (e, n) in errs.items()
            if math.isfinite(e)}


def layer_macs_after(layer: ConvLayer, rank: Rank, emitted: Emitted | None) -> int:
    """MACs of the rewritten layer, counting a merge into the producer."""
    after = method_named(rank.method).macs_after(layer, rank)
    if emitted is None or emitted.merged_into is None:
        return after
    reduce = conv_macs(layer.in_positions, rank.r, layer.channels, [1])
    return after - reduce + emitted.producer_macs_delta


def _kept_energy(energy, r: int) -> float:
    """Energy kept at rank r; a spectrum shorter than r (degenerate data: rank-deficient
    covariance) keeps all of it."""
    return float(energy[min(r, len(energy)) - 1]) if len(energy) else 0.0


def layer_details(layer: ConvLayer, rank: Rank, spectra: Mapping, measured: Mapping[int, float],
                  sensitivity: Mapping[int, float], emitted: Emitted | None = None) -> dict:
    """The per-layer numbers of a decision (estimated, measured, sensitivity, merge)."""
    spectrum = spectra[(layer.index, spectrum_key(rank))]
    details: dict = {"rank": rank.r, "channels": layer.channels,
                     "estimated_rel_error": (
                         spectrum.relative_error(rank.r) if rank.r_out is None
                         else spectrum.in_out_error(rank.r, rank.r_out, layer.out_channels)),
                     "kept_energy": _kept_energy(spectrum.energy(), rank.r)}
    if rank.method != "in":
        details["method"] = rank.method
    if rank.r_out is not None:
        details["rank_out"] = rank.r_out
    if emitted is not None and emitted.merged_into is not None:
        details["merged_into"] = emitted.merged_into
    if layer.index in measured:
        details["measured_rel_error"] = measured[layer.index]
    if layer.index in sensitivity:
        details["sensitivity_task_error"] = sensitivity[layer.index]
    return details


def plan_line(rank: Rank, details: dict) -> str:
    """The decision as the dry run prints it: rank, estimated and measured errors."""
    parts = [str(rank), f"est. err {details['estimated_rel_error']:.3f}"]
    if "measured_rel_error" in details:
        parts.append(f"measured {details['measured_rel_error']:.3f}")
    if "sensitivity_task_error" in details:
        parts.append(f"sensitivity {details['sensitivity_task_error']:.3f}")
    if "task_error" in details:
        parts.append(f"task error {details['task_error']:.4f}")
    if "merged_into" in details:
        parts.append(f"merged into {details['merged_into']}")
    if "layer_ms_before" in details:
        parts.append(f"{details['layer_ms_before']:.3f} -> {details['layer_ms_after']:.3f} ms "
                     f"(x{details['layer_speedup']:.2f})")
    return ", ".join(parts)


def record_skips(report: PassReport, selection: Selection, plan: Plan | None = None) -> None:
    """Refusals from selection, and candidates the plan left alone, with their reasons."""
    for skip in selection.skipped:
        report.skipped(skip.name, "Conv", skip.reason)
    if plan is None:
        return
    for layer in selection.layers:
        if layer.index not in plan.ranks:
            report.skipped(layer.name, "Conv", plan.reason(layer.index), macs_before=layer.macs,
                           params_before=layer.params, details=plan.details.get(layer.index, {}))


def record_applied(report: PassReport, layers: Sequence[ConvLayer], plan: Plan,
                   emitted: Mapping[int, Emitted], spectra: Mapping,
                   measured: Mapping[int, float], sensitivity: Mapping[int, float],
                   timer: conv_timing.ConvTimer | None = None,
                   extra: Mapping[int, dict] | None = None) -> None:
    """One applied decision per rewritten layer."""
    for layer in layers:
        if layer.index not in emitted:
            continue
        rank, info = plan.ranks[layer.index], emitted[layer.index]
        details = layer_details(layer, rank, spectra, measured, sensitivity, info)
        details.update((extra or {}).get(layer.index, {}))
        if timer is not None:
            details.update(timer(conv_layer_timing(layer), rank.r, rank.r_out).as_details())
        report.applied(layer.name, "Conv", plan_line(rank, details), macs_before=layer.macs,
                       macs_after=int(layer_macs_after(layer, rank, info)),
                       params_before=layer.params,
                       params_after=method_named(rank.method).params_after(layer, rank),
                       details=details)


def record_totals(report: PassReport, selection: Selection, init: str, mode: str) -> None:
    rows = [d for d in report.decisions if d.applied]
    before = sum(d.macs_before or 0 for d in rows)
    after = sum(d.macs_after or 0 for d in rows)
    total = selection.total_macs
    report.metrics.update({
        "init": init,
        "mode": mode,
        "layers_rewritten": len(rows),
        "candidates": len(selection.layers),
        "layer_macs_before": before,
        "layer_macs_after": after,
        "model_macs_before": total,
        "model_macs_removed_share": (before - after) / total if total else 0.0,
    })
    measured = [d.details["measured_rel_error"] for d in rows if "measured_rel_error" in d.details]
    if measured:
        report.metrics["max_measured_rel_error"] = max(measured)


def record_timing_totals(report: PassReport, timer: conv_timing.ConvTimer, threads: int,
                         model_ms: float | None) -> None:
    """Sums of the applied layers' measured times (each timed alone, so they add up only
    approximately to the model's change)."""
    rows = [d for d in report.decisions if d.applied and "layer_ms_before" in d.details]
    before = sum(d.details["layer_ms_before"] for d in rows)
    after = sum(d.details["layer_ms_after"] for d in rows)
    report.metrics.update({
        "objective": "latency",
        "timing_threads": threads,
        "layer_ms_before": round(before, 4),
        "layer_ms_after": round(after, 4),
        "layers_timed": timer.measurements,
    })
    if model_ms:
        report.metrics["model_time_removed_share_est"] = round((before - after) / model_ms, 4)
