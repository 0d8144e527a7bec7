"""`bottleneck`: a 1x1 reduction before every expensive kxk conv, factorized from its weights.

Pattern: a group-1 Conv with a constant kernel larger than 1x1 (`rewriter.lowrank_select`).
Rewrite: `mode=in` puts a 1x1 conv `P [r, C]` (stride 1, no padding: it commutes with zero
padding) before the kxk conv `W2 [O, r, k]`, which keeps the original strides, pads, auto_pad,
dilations and bias; `mode=in-out` (Tucker-2) also splits W2 into a kxk core to `r_out` channels
and a 1x1 restore. `method=auto` lets one global plan (a `target` or `target=auto`) choose per
layer between `in`, `in-out` and the spatial split of `spatial-svd` by least error per MAC
saved. The factors come from `rewriter.lowrank` (svd, whitened, refit); see design.md §4.1.

`objective=latency` replaces MACs by onnxruntime time measured on this machine
(`rewriter.conv_timing`: each layer alone at its real input shape, before vs after): a layer
whose rewrite saves less than `min-gain` of its time is skipped, and `target` becomes a share of
the model's measured time, allocated by least error per millisecond saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import onnx_ir as ir
from rewriter.passes import register
from rewriter.passes.base import RewritePass, option
from rewriter.passes.lowrank_pass import (
    LowRankOptions,
    Timing,
    measures_on_holdout,
    run_lowrank,
    select_rules,
    sweep_floor,
)

from rewriter.downstream import cut_macs
from rewriter.lowrank_methods import METHODS
from rewriter.lowrank_sensitivity import sweep_samples


@dataclass
class BottleneckOptions(LowRankOptions):
    mode: Literal["in", "in-out"] | None = option(
        None, "in: 1x1 reduce + kxk; in-out: Tucker-2 (1x1 reduce, kxk core, 1x1 restore); "
              "default in")
    method: Literal["mode", "auto"] | None = option(
        None, "mode: the factorization `mode` names, every layer; auto: per layer the best "
              "of in, in-out and spatial (kx1 then 1xk) by measured error per MAC saved (needs "
              "target); default auto when a target is given with calibration data and no mode "
              "is named, else mode")
    refit_reduce: int = option(1, "refit: alternations that also refit the 1x1 (small layers)")
    merge: bool = option(True, "fold the 1x1 into a preceding linear 1x1 conv")
    objective: Literal["macs", "latency"] = option(
        "macs", "macs: rank by MACs saved; latency: time each layer in onnxruntime on this "
                "machine, skip layers that are not faster, and read target as a share of the "
                "model's measured time (costs timing runs)")
    threads: int = option(1, "objective=latency: onnxruntime intra-op threads for the timings")
    min_gain: float = option(0.05, "objective=latency: skip a layer whose rewrite saves less "
                                   "than this share of its measured time")
    latency_ranks: int = option(6, "objective=latency with target: ranks timed per layer")

    def validate(self) -> None:
        super().validate()
        if self.threads < 1:
            raise ValueError("threads must be >= 1")
        if not 0 <= self.min_gain < 1:
            raise ValueError("min-gain must be in [0, 1)")
        if self.latency_ranks < 1:
            raise ValueError("latency-ranks must be >= 1")
        if self.method == "auto" and self.objective == "latency":
            raise ValueError("method=auto ranks by MACs; it does not combine with "
                             "objective=latency")


@register
class BottleneckPass(RewritePass):
    name = "bottleneck"
    summary = "1x1 reduction before expensive kxk convs, factorized from the trained weights"
    Options = BottleneckOptions
    exact = False

    def chooses_on_holdout(self) -> bool:
        opts: BottleneckOptions = self.options  # type: ignore[assignment]
        return measures_on_holdout(opts, 3 if resolved_method(opts, True) == "auto" else 1)

    def apply(self, model: ir.Model) -> None:
        opts: BottleneckOptions = self.options  # type: ignore[assignment]
        method = resolved_method(opts, self.context.has_data)
        mode = opts.mode or "in"
        if method == "auto" and opts.method is None:
            method = self._affordable_auto(model, opts)
        if method == "auto":
            methods = list(AUTO_METHODS)
        else:
            methods = [METHODS[mode]]
        timing = None
        if opts.objective == "latency":
            timing = Timing(opts.threads, opts.min_gain, opts.latency_ranks)
        run_lowrank(model, opts, self.context, self.report, self.name, methods,
                    "a 1x1 reduction", "auto" if method == "auto" else mode,
                    merge=opts.merge, refit_reduce=opts.refit_reduce, timing=timing)

    def _affordable_auto(self, model: ir.Model, opts: BottleneckOptions) -> str:
        """The default method=auto when its single-layer trials fit the budget, else mode.

        Each trial runs the rewritten layer and what it feeds on the held-out samples the sweep
        uses (`sweep_samples`), so the cost is, summed over layers, methods x ranks x samples x
        the MACs from the layer down;
        past `MEASURE_BUDGET_MACS` the default stays one factorization (naming method=auto
        measures anyway).
        """
        from rewriter.lowrank_select import select_convs

        selection = select_convs(model, select_rules(opts, opts.pointwise is not False),
                                 self.context.input_shapes)
        held_out = self.context.holdout.n if self.context.holdout is not None else 0
        layers = selection.layers
        below = cut_macs(selection.analysis, [x.index for x in layers])
        per_layer = {x.index: opts.measure_ranks * sum(m.refusal(x) is None for m in AUTO_METHODS)
                     for x in layers}
        trials = sum(per_layer.values())
        per_sample = sum(n * below[i] for i, n in per_layer.items())
        samples = sweep_samples(held_out, per_sample, sweep_floor(opts, self.context),
                                opts.measure_samples)
        cost = samples * per_sample
        if cost > MEASURE_BUDGET_MACS:
            self.report.note(
                f"method=mode (one factorization): measuring {trials} single-layer trials on "
                f"{samples} held-out samples would run ~{cost / 1e12:.0f} T MACs, over the "
                f"default's {MEASURE_BUDGET_MACS / 1e12:.0f} T; name method=auto to measure "
                "anyway (it keeps detectors' class scores far better)")
            return "mode"
        self.report.note("method=auto (the default with a target and calibration data): per "
                         "layer in, in-out or spatial by measured task error per MAC saved; "
                         "name a mode to use one everywhere")
        return "auto"


#: What method=auto chooses among, per layer.
AUTO_METHODS = (METHODS["in"], METHODS["in-out"], METHODS["spatial"])
#: Model MACs x held-out samples x trials the default method=auto may spend on measuring
#: (a few minutes at the ~30-40 G MAC/s onnxruntime reaches on 2 cores, sessions included).
MEASURE_BUDGET_MACS = 1e13


def resolved_method(opts: BottleneckOptions, has_data: bool) -> str:
    """The method a run uses: as given, else auto for a target with calibration data and no
    named mode (measured per-layer allocation keeps a detector's task at a cut where one
    factorization everywhere loses it: README, trained detector), else mode."""
    if opts.method is not None:
        return opts.method
    if opts.target is not None and opts.mode is None and has_data and opts.objective == "macs":
        return "auto"
    return "mode"


__all__ = ["BottleneckOptions", "BottleneckPass", "resolved_method"]
