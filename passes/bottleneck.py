"""`bottleneck`: a 1x1 reduction before every expensive kxk conv, factorized from its weights.

Pattern: a group-1 Conv with a constant kernel larger than 1x1. Check: the layer is selected
(include/exclude, min-channels, min-macs) and its rank saves MACs. Rewrite: `mode=in` puts a
1x1 conv `P [r, C]` (stride 1, no padding: it commutes with zero padding) before the kxk conv
`W2 [O, r, k]`, which keeps the original strides, pads, auto_pad, dilations and bias;
`mode=in-out` (Tucker-2) also splits W2 into a kxk core to `r_out` channels and a 1x1 restore.
The factors come from `rewriter.lowrank` (svd, whitened, refit); see design.md §4.1, App. A.

`objective=latency` replaces MACs by onnxruntime time measured on this machine
(`rewriter.conv_timing`: each layer alone at its real input shape, before vs after): a layer
whose rewrite saves less than `min-gain` of its time is skipped, and `target` becomes a share of
the model's measured time, allocated by least error per millisecond saved.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
from rewriter.passes import register
from rewriter.passes.base import PassOptions, RewritePass, option

from rewriter import conv_timing, lowrank, runtime
from rewriter.cost import conv_macs, model_cost, round_rank
from rewriter.errors import PassError
from rewriter.fidelity import compare_arrays, output_fidelity
from rewriter.graph import (
    ConvGeometry,
    Namer,
    const_array,
    conv_geometry,
    float_dtype_of,
    make_node,
    new_initializer,
    pointwise_conv_attrs,
    replace_value,
)
from rewriter.pointwise import compose, linear_pointwise_producer
from rewriter.progress import Counter
from rewriter.shapes import static_shape, with_input_shapes

DEFAULT_RATIO = 0.5
#: Memory for the original model's sampled layer outputs held at once during refit.
TARGET_BYTES = 512 * 2**20
#: Refitting the 1x1 too assembles (r·C)² normal equations from (C·K)² moments: only for
#: layers where that costs at most this many multiply-adds.
REDUCE_REFIT_LIMIT = 4e9


@dataclass
class BottleneckOptions(PassOptions):
    ratio: float | None = option(None, "rank as a share of the input channels (0.5 when no other "
                                       "rank option is given)")
    rank: int | None = option(None, "fixed rank for every layer")
    energy: float | None = option(None, "keep this share of the (whitened) squared spectrum")
    target: float | Literal["auto"] | None = option(
        None, "remove this share of the whole model's MACs (allocated by least error per MAC "
              "saved), or 'auto': the largest cut whose held-out cosine stays >= min-cosine")
    min_cosine: float = option(0.99, "fidelity floor for target=auto (worst output cosine)", le=1)
    init: Literal["auto", "svd", "whitened", "refit"] = option(
        "auto", "factor init: refit with --calib, svd without")
    mode: Literal["in", "in-out"] = option("in", "in: 1x1 reduce + kxk; in-out: Tucker-2 "
                                                 "(1x1 reduce, kxk core, 1x1 restore)")
    round: int = option(8, "round ranks to a multiple of this (1: no rounding)")
    min_channels: int = option(8, "skip convs with fewer input channels")
    min_macs: float = option(0.0, "skip convs below this share of the model's MACs", le=1)
    include: list[str] = option([], "only node names matching these globs (a+b)")
    exclude: list[str] = option([], "never node names matching these globs (a+b)")
    shrink: float = option(lowrank.DEFAULT_SHRINK, "covariance shrinkage toward the diagonal",
                           le=1)
    ridge: float = option(lowrank.DEFAULT_RIDGE, "refit ridge, relative to the mean diagonal")
    max_positions: int = option(4096, "refit: output positions sampled per calibration batch",
                                ge=1)
    refit_reduce: int = option(1, "refit: alternations that also refit the 1x1 (small layers)")
    merge: bool = option(True, "fold the 1x1 into a preceding linear 1x1 conv")
    sensitivity: bool = option(True, "with --calib: measure each layer's effect on the output")
    auto_steps: int = option(6, "bisection steps for target=auto", ge=1)
    objective: Literal["macs", "latency"] = option(
        "macs", "macs: rank by MACs saved; latency: time each layer in onnxruntime on this "
                "machine, skip layers that are not faster, and read target as a share of the "
                "model's measured time (costs timing runs)")
    threads: int = option(1, "objective=latency: onnxruntime intra-op threads for the timings")
    min_gain: float = option(0.05, "objective=latency: skip a layer whose rewrite saves less "
                                   "than this share of its measured time")
    latency_ranks: int = option(6, "objective=latency with target: ranks timed per layer")

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
        if self.threads < 1:
            raise ValueError("threads must be >= 1")
        if not 0 <= self.min_gain < 1:
            raise ValueError("min-gain must be in [0, 1)")
        if self.latency_ranks < 1:
            raise ValueError("latency-ranks must be >= 1")


@dataclass
class Candidate:
    """A conv the pass may rewrite, with everything read once from the graph."""

    index: int  # position in the main graph at pass start (same in the original copy)
    node: ir.Node
    weight: np.ndarray  # float64
    bias: np.ndarray | None
    geometry: ConvGeometry
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    macs: int
    dtype: np.dtype
    output_name: str  # the conv's output in the original model
    spectrum: lowrank.Spectrum | None = None

    @property
    def name(self) -> str:
        return self.node.name or f"Conv#{self.index}"

    @property
    def channels(self) -> int:
        return self.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def window(self) -> lowrank.Window:
        g = self.geometry
        return lowrank.Window(g.kernel, g.strides, g.dilations, g.pads, g.auto_pad)

    def macs_after(self, rank: int, rank_out: int | None = None) -> int:
        """MACs of the factorized layer (reduce + kxk [+ restore])."""
        c, o = self.channels, self.out_channels
        in_pos = math.prod(self.in_shape) // c
        out_pos = math.prod(self.out_shape) // o
        reduce = conv_macs(in_pos, rank, c, [1])
        if rank_out is None:
            return reduce + conv_macs(out_pos, o, rank, self.geometry.kernel)
        return (reduce + conv_macs(out_pos, rank_out, rank, self.geometry.kernel)
                + conv_macs(out_pos, o, rank_out, [1]))

    @property
    def layer(self) -> conv_timing.ConvLayer:
        """What its onnxruntime time depends on (objective=latency)."""
        return conv_timing.ConvLayer(self.in_shape, self.out_channels, self.geometry,
                                     self.bias is not None, self.dtype.name)

    def params_after(self, rank: int, rank_out: int | None = None) -> int:
        k = math.prod(self.geometry.kernel)
        o, c = self.out_channels, self.channels
        bias = o if self.bias is not None else 0
        if rank_out is None:
            return rank * c + o * rank * k + bias
        return rank * c + rank_out * rank * k + o * rank_out + bias


@dataclass(frozen=True)
class Rank:
    """Chosen ranks: `r` input-side, `r_out` output-side (in-out mode only)."""

    r: int
    r_out: int | None = None


@register
class BottleneckPass(RewritePass):
    name = "bottleneck"
    summary = "1x1 reduction before expensive kxk convs, factorized from the trained weights"
    Options = BottleneckOptions
    exact = False

    # ------------------------------------------------------------------ entry

    def apply(self, model: ir.Model) -> None:
        opts: BottleneckOptions = self.options  # type: ignore[assignment]
        init = self._resolve_init()
        if opts.target == "auto" and not self.context.has_data:
            raise PassError("bottleneck: target=auto needs calibration data (--calib)")
        original = self._original
        candidates, total_macs = self._collect(model)
        if not candidates:
            self._nothing_to_do()
            return
        self._spectra(original, candidates, init)
        budget: float = total_macs  # what `target` is a share of
        if opts.objective == "latency":
            self._timer = conv_timing.ConvTimer(threads=opts.threads)
            if opts.target is not None:
                budget = self._model_ms(original, candidates)
        if opts.target == "auto":
            plan = self._auto_plan(original, candidates, budget, init)
        else:
            plan = self._plan(candidates, budget, opts.target)
        if self._timer is not None and opts.target is None:
            plan = self._drop_slower(candidates, plan)
        self._record_unplanned(candidates, plan)
        if not plan:
            self._nothing_to_do()
            return
        applied = self._execute(model, original, candidates, plan, init)
        self._measure(model, original, candidates, plan, applied)
        self._totals(candidates, plan, total_macs, init)
        if self._timer is not None:
            self._timing_totals(budget if opts.target is not None else None)

    def _resolve_init(self) -> str:
        init = self.options.init
        if init == "auto":
            if self.context.has_data:
                return "refit"
            self.report.note("init=svd: no calibration data given; data-aware inits "
                             "(whitened, refit) need --calib and are more accurate")
            return "svd"
        if init != "svd" and not self.context.has_data:
            raise PassError(f"bottleneck: init={init} needs calibration data (--calib)")
        if init != "svd" and self.context.synthetic:
            self.report.note(f"init={init} on random calibration data: the factors are only as "
                             "good as the data")
        return init

    def _nothing_to_do(self) -> None:
        saves = "saves MACs" if self._timer is None else "is measured faster in onnxruntime"
        self.report.note(f"nothing to do: no conv where a 1x1 reduction {saves}; "
                         "model unchanged")

    # ------------------------------------------------------------------ pattern + check

    def _collect(self, model: ir.Model) -> tuple[list[Candidate], int]:
        opts: BottleneckOptions = self.options  # type: ignore[assignment]
        analysis = with_input_shapes(model, self.context.input_shapes)
        total = model_cost(analysis).macs
        shaped = list(analysis.graph)
        candidates = []
        positions = {id(n): i for i, n in enumerate(model.graph)}
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
                continue
            if id(node) not in positions:
                self.report.skipped(node.name or "", "Conv", "inside a subgraph")
                continue
            index = positions[id(node)]
            cand_or_reason = self._check(node, index, shaped[index], total, opts)
            if isinstance(cand_or_reason, str):
                self.report.skipped(node.name or f"Conv#{index}", "Conv", cand_or_reason)
            else:
                candidates.append(cand_or_reason)
        return candidates, total

    def _check(self, node: ir.Node, index: int, shaped: ir.Node, total: int,
               opts: BottleneckOptions) -> Candidate | str:
        name = node.name or ""
        if opts.include and not any(fnmatch.fnmatchcase(name, p) for p in opts.include):
            return "not included"
        if any(fnmatch.fnmatchcase(name, p) for p in opts.exclude):
            return "excluded"
        w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None:
            return "weight computed at run time"
        if not np.issubdtype(w.dtype, np.floating):
            return f"weight dtype {w.dtype} is not float"
        geometry = conv_geometry(node, w.shape)
        if geometry.group != 1:
            return "depthwise conv" if w.shape[1] == 1 else "grouped conv"
        if geometry.is_pointwise:
            return "pointwise already"
        bias = None
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = const_array(node.inputs[2])
            if bias is None:
                return "bias computed at run time"
        in_shape = static_shape(shaped.inputs[0])
        out_shape = static_shape(shaped.outputs[0])
        if in_shape is None or out_shape is None:
            return "unknown shapes (pass --input-shape)"
        if w.shape[1] < opts.min_channels:
            return f"below min-channels ({w.shape[1]} < {opts.min_channels})"
        macs = math.prod(out_shape) * math.prod(w.shape[1:])
        if total and macs < opts.min_macs * total:
            return f"below min-macs ({macs / total:.2%} of the model)"
        return Candidate(
            index=index, node=node, weight=w.astype(np.float64),
            bias=None if bias is None else bias.astype(np.float64), geometry=geometry,
            in_shape=in_shape, out_shape=out_shape, macs=macs,
            dtype=float_dtype_of(node.inputs[1]), output_name=node.outputs[0].name,
        )

    # ------------------------------------------------------------------ spectra

    def _spectra(self, original: ir.Model, candidates: list[Candidate], init: str) -> None:
        """Whitened spectra from one capture run of the original model (svd when no data)."""
        if init == "svd":
            for cand in candidates:
                cand.spectrum = lowrank.svd_spectrum(cand.weight)
            return
        self.context.log(f"bottleneck: input statistics of {len(candidates)} convs")
        moments = {c.index: lowrank.SecondMoment(c.channels) for c in candidates}
        names = {c.index: _node_at(original, c.index).inputs[0].name for c in candidates}
        for batch in self.context.capture(original, sorted(set(names.values())), "fit"):
            for cand in candidates:
                moments[cand.index].add(batch[names[cand.index]])
        for cand in candidates:
            sigma = moments[cand.index].value()
            cand.spectrum = lowrank.whitened_spectrum(cand.weight, sigma, self.options.shrink)

    # ------------------------------------------------------------------ rank selection

    def _rank_choices(self, cand: Candidate) -> list[Rank]:
        """Allowed ranks below full that save MACs, largest first."""
        out = []
        for r in reversed(lowrank.candidate_ranks(cand.channels, self.options.round)):
            rank = self._pair(cand, r)
            if cand.macs_after(rank.r, rank.r_out) < cand.macs:
                out.append(rank)
        return out

    def _pair(self, cand: Candidate, r: int) -> Rank:
        """in-out mode: the output rank keeps the same share of the output channels."""
        if self.options.mode != "in-out":
            return Rank(r)
        share = r / cand.channels
        return Rank(r, round_rank(share * cand.out_channels, self.options.round, cand.out_channels))

    def _plan(self, candidates: list[Candidate], total: float,
              target: float | None) -> dict[int, Rank]:
        """Rank per candidate index; skipped candidates are recorded with their reason.
        With a target, `total` is the model's MACs (or measured ms with objective=latency)."""
        opts: BottleneckOptions = self.options  # type: ignore[assignment]
        plan: dict[int, Rank] = {}
        if target is not None:
            choices = [self._layer_choices(c) for c in candidates]
            alloc = lowrank.allocate_ranks([c for c in choices if c.ranks], target * total)
            if not alloc.reached:
                unit = "MACs" if self._timer is None else "measured time"
                self.report.note(f"target {target:.0%} not reachable: at most "
                                 f"{alloc.macs_saved / max(total, 1e-12):.1%} of the {unit} "
                                 "removed")
            by_index = {c.index: c for c in candidates}
            for index, r in alloc.ranks.items():
                plan[index] = self._pair(by_index[index], r)
            self._unplanned_reason = "target met without this layer"
            return plan
        for cand in candidates:
            if opts.rank is not None:
                r = min(opts.rank, cand.channels)
            elif opts.energy is not None:
                r = lowrank.round_up(lowrank.rank_for_energy(cand.spectrum, opts.energy),
                                     opts.round, cand.channels)
            else:
                ratio = opts.ratio if opts.ratio is not None else DEFAULT_RATIO
                r = round_rank(ratio * cand.channels, opts.round, cand.channels)
            rank = self._pair(cand, r)
            if r < cand.channels and cand.macs_after(rank.r, rank.r_out) < cand.macs:
                plan[cand.index] = rank
        self._unplanned_reason = "rank would not save MACs"
        return plan

    def _layer_choices(self, cand: Candidate) -> lowrank.LayerChoices:
        ranks = self._rank_choices(cand)
        if self._timer is not None:
            return self._timed_choices(cand, ranks)
        return lowrank.LayerChoices(
            key=cand.index,
            ranks=[rk.r for rk in ranks],
            macs_saved=[cand.macs - cand.macs_after(rk.r, rk.r_out) for rk in ranks],
            error_sq=[cand.spectrum.relative_error(rk.r) ** 2 for rk in ranks],
        )

    def _timed_choices(self, cand: Candidate, ranks: list[Rank]) -> lowrank.LayerChoices:
        """objective=latency: a grid of `latency-ranks` ranks, each timed; the gain is the
        measured ms saved, and ranks saving less than `min-gain` of the layer's time drop out."""
        opts: BottleneckOptions = self.options  # type: ignore[assignment]
        if len(ranks) > opts.latency_ranks:
            picks = np.linspace(0, len(ranks) - 1, opts.latency_ranks).round().astype(int)
            ranks = [ranks[i] for i in sorted(set(picks.tolist()))]
        kept, gains = [], []
        for rk in ranks:
            timing = self._timer(cand.layer, rk.r, rk.r_out)
            if timing.saved_share >= opts.min_gain:
                kept.append(rk)
                gains.append(timing.saved_ms)
        if ranks and not kept:
            self._skip_reasons[cand.index] = _slower_reason(self._timer(cand.layer, ranks[-1].r,
                                                                        ranks[-1].r_out))
        return lowrank.LayerChoices(
            key=cand.index,
            ranks=[rk.r for rk in kept],
            macs_saved=gains,
            error_sq=[cand.spectrum.relative_error(rk.r) ** 2 for rk in kept],
        )

    def _drop_slower(self, candidates: list[Candidate], plan: dict[int, Rank]
                     ) -> dict[int, Rank]:
        """objective=latency without target: keep the layers whose measured time drops."""
        kept = {}
        for cand in candidates:
            rank = plan.get(cand.index)
            if rank is None:
                continue
            timing = self._timer(cand.layer, rank.r, rank.r_out)
            if timing.saved_share >= self.options.min_gain:
                kept[cand.index] = rank
            else:
                self._skip_reasons[cand.index] = _slower_reason(timing)
                self._skip_details[cand.index] = {"rank": rank.r, **timing.as_details()}
        return kept

    def _model_ms(self, original: ir.Model, candidates: list[Candidate]) -> float:
        """The whole model's onnxruntime time: the budget a latency target takes a share of."""
        ms = conv_timing.model_time_ms(original, self.context.input_shapes, self.options.threads,
                                       batch=candidates[0].in_shape[0])
        self.report.metrics["model_ms_before"] = round(ms, 4)
        self.report.note(f"objective=latency: target is a share of the model's measured "
                         f"onnxruntime time ({ms:.2f} ms, {self.options.threads} thread(s))")
        return ms

    def _auto_plan(self, original: ir.Model, candidates: list[Candidate], total: float,
                   init: str) -> dict[int, Rank]:
        """Bisect the MAC cut against the held-out cosine gate (each step a full rewrite)."""
        opts: BottleneckOptions = self.options  # type: ignore[assignment]
        choices = [self._layer_choices(c) for c in candidates]
        most = lowrank.allocate_ranks([c for c in choices if c.ranks], total).macs_saved
        lo, hi = 0.0, most / max(total, 1e-12)
        best: dict[int, Rank] = {}
        reference = runtime.run_all(original, self.context.holdout.inputs)
        for step in range(opts.auto_steps):
            mid = hi if step == 0 else (lo + hi) / 2
            plan = self._quiet_plan(candidates, total, mid)
            trial = original.clone()
            self._execute(trial, original, candidates, plan, init)
            got = runtime.run_all(trial, self.context.holdout.inputs)
            cosine = output_fidelity(reference, got)["cosine"]
            self.context.log(f"bottleneck auto: cut {mid:.1%} -> cosine {cosine:.5f}")
            if cosine >= opts.min_cosine:
                lo, best = mid, plan
                if step == 0:
                    break
            else:
                hi = mid
        self.report.metrics["auto_target"] = lo
        unit = "MACs" if self._timer is None else "measured time"
        self.report.note(f"target=auto: {lo:.1%} of the {unit} removed keeps held-out cosine "
                         f">= {opts.min_cosine}")
        self._unplanned_reason = "not needed for the auto target"
        return best

    def _quiet_plan(self, candidates: list[Candidate], total: int,
                    target: float) -> dict[int, Rank]:
        notes = list(self.report.notes)
        plan = self._plan(candidates, total, target)
        self.report.notes[:] = notes
        return plan

    # ------------------------------------------------------------------ rewrite

    def _execute(self, model: ir.Model, original: ir.Model, candidates: list[Candidate],
                 plan: dict[int, Rank], init: str) -> dict[int, dict]:
        """Rewrite the planned layers of `model` in topological order; returns per-layer info."""
        namer = Namer(model)
        nodes = list(model.graph)
        applied: dict[int, dict] = {}
        self._merged_values = set()  # ids of values a later layer's reduce was merged into
        chosen = [c for c in candidates if c.index in plan]
        if init != "refit":
            for m in chosen:
                factors = m.spectrum.factors(plan[m.index].r, m.out_channels, m.geometry.kernel,
                                             m.bias)
                applied[m.index] = self._rewrite(model, nodes[m.index], m, factors,
                                                 plan[m.index], namer)
            return applied
        layers = Counter(len(chosen), "refit layer")
        for chunk in self._target_chunks(chosen):
            targets = self._capture_targets(chunk)
            by_index = {c.index: c for c in chunk}
            for group in _independent_groups(original, list(by_index)):
                members = [by_index[i] for i in group]
                self.context.log(f"bottleneck: refit {', '.join(m.name for m in members)}")
                factors = self._refit(model, nodes, members, plan, targets)
                for m in members:
                    applied[m.index] = self._rewrite(model, nodes[m.index], m, factors[m.index],
                                                     plan[m.index], namer)
                    del targets[m.index]
                layers.advance(len(members))
        layers.close()
        return applied

    def _record_unplanned(self, candidates: list[Candidate], plan: dict[int, Rank]) -> None:
        for cand in candidates:
            if cand.index not in plan:
                self.report.skipped(cand.name, "Conv",
                                    self._skip_reasons.get(cand.index, self._unplanned_reason),
                                    macs_before=cand.macs,
                                    params_before=cand.weight.size + _size(cand.bias),
                                    details=self._skip_details.get(cand.index, {}))

    def _target_chunks(self, chosen: list[Candidate]) -> list[list[Candidate]]:
        """Consecutive layers whose sampled original outputs fit the memory budget together."""
        fit = self.context.fit
        batch = self.context.batch_size
        n_batches = -(-fit.n // batch)
        chunks: list[list[Candidate]] = []
        used = TARGET_BYTES
        for cand in chosen:
            need = lowrank.SampledTargets.nbytes_estimate(
                n_batches, batch, cand.out_shape[1:], self.options.max_positions)
            if used + need > TARGET_BYTES and (not chunks or chunks[-1]):
                chunks.append([])
                used = 0
            chunks[-1].append(cand)
            used += need
        return chunks

    def _capture_targets(self, chunk: list[Candidate]) -> dict[int, lowrank.SampledTargets]:
        """One run of the original model: each layer's output y at sampled positions."""
        targets = {c.index: lowrank.SampledTargets() for c in chunk}
        rngs = {c.index: np.random.default_rng([self.context.seed, c.index]) for c in chunk}
        names = sorted({c.output_name for c in chunk})
        for batch in self.context.capture(self._original, names):
            for c in chunk:
                targets[c.index].add(batch[c.output_name], self.options.max_positions,
                                     rngs[c.index])
        return targets

    def _refit(self, model: ir.Model, nodes: list[ir.Node], members: list[Candidate],
               plan: dict[int, Rank], targets: dict[int, lowrank.SampledTargets]
               ) -> dict[int, lowrank.Factors | lowrank.Tucker2]:
        """Least squares for each member's kxk conv on the rewritten model's activations."""
        opts: BottleneckOptions = self.options  # type: ignore[assignment]
        x_names = {m.index: nodes[m.index].inputs[0].name for m in members}
        accs = {}
        for m in members:
            start = m.spectrum.factors(plan[m.index].r, m.out_channels, m.geometry.kernel, m.bias)
            accs[m.index] = lowrank.RefitAccumulator(start.reduce, m.out_channels, m.window)
        self._feed(model, members, x_names, accs, targets)
        factors = {i: acc.solve(opts.ridge) for i, acc in accs.items()}
        for _ in range(opts.refit_reduce):
            small = [m for m in members if _reduce_refit_cost(m, plan[m.index].r)
                     <= REDUCE_REFIT_LIMIT]
            if not small:
                break
            reducers = {m.index: lowrank.ReduceRefitAccumulator(
                factors[m.index].kernel, factors[m.index].bias, m.window, m.channels)
                for m in small}
            self._feed(model, small, x_names, reducers, targets)
            refits = {}
            for m in small:
                p, _ = lowrank._balance(reducers[m.index].solve(opts.ridge),
                                        np.zeros((plan[m.index].r, 1)))
                refits[m.index] = lowrank.RefitAccumulator(p, m.out_channels, m.window)
            self._feed(model, small, x_names, refits, targets)
            for m in small:
                accs[m.index] = refits[m.index]
                factors[m.index] = refits[m.index].solve(opts.ridge)
        out: dict[int, lowrank.Factors | lowrank.Tucker2] = {}
        for m in members:
            r_out = plan[m.index].r_out
            if r_out is None:
                out[m.index] = factors[m.index]
            else:
                moment = accs[m.index].equations.input_moment()
                out[m.index] = lowrank.restore_outputs(factors[m.index], r_out, moment)
        return out

    def _feed(self, model: ir.Model, members: list[Candidate], x_names: dict[int, str],
              accs: dict, targets: dict[int, lowrank.SampledTargets]) -> None:
        """Stream x̂ from the rewritten model, paired batch by batch with the original's
        sampled outputs, into the accumulators."""
        current = self.context.capture(model, sorted(set(x_names[m.index] for m in members)))
        for b, x_batch in enumerate(current):
            for m in members:
                positions, rows = targets[m.index].batches[b]
                accs[m.index].add_rows(x_batch[x_names[m.index]], targets[m.index].out_dims,
                                       positions, rows)

    def _rewrite(self, model: ir.Model, node: ir.Node, cand: Candidate,
                 factors: lowrank.Factors | lowrank.Tucker2, rank: Rank, namer: Namer) -> dict:
        """Replace `node` by reduce (or a merged producer) -> kxk [-> restore]."""
        opts: BottleneckOptions = self.options  # type: ignore[assignment]
        if rank.r_out is not None and isinstance(factors, lowrank.Factors):
            factors = lowrank.restore_outputs(factors, rank.r_out)
        graph = model.graph
        spatial = len(cand.geometry.kernel)
        base = node.name or f"conv{cand.index}"
        ones = [1] * spatial
        info: dict = {"rank": rank.r}
        x = node.inputs[0]
        producer = linear_pointwise_producer(x) if opts.merge else None
        if producer is not None:
            w, b = compose(producer, factors.reduce)
            pnode = producer.node
            pname = pnode.name or "pointwise"
            new_w = new_initializer(graph, namer(f"{pname}_W"),
                                    w.reshape(*w.shape, *ones).astype(cand.dtype))
            new_b = new_initializer(graph, namer(f"{pname}_B"), b.astype(cand.dtype))
            pnode.replace_input_with(1, new_w)
            if len(pnode.inputs) < 3:
                pnode.resize_inputs(3)
            pnode.replace_input_with(2, new_b)
            x.shape = None
            z = x
            self._merged_values.add(id(x))
            info["merged_into"] = pname
            info["producer_macs_delta"] = (
                (math.prod(cand.in_shape) // cand.channels)
                * producer.weight.shape[1] * (rank.r - cand.channels)
            )
        else:
            p = new_initializer(graph, namer(f"{base}_reduce_W"),
                                factors.reduce.reshape(rank.r, cand.channels, *ones)
                                .astype(cand.dtype))
            reduce = make_node("Conv", [x, p], pointwise_conv_attrs(spatial),
                               name=namer(f"{base}_reduce"), namer=namer)
            graph.insert_before(node, reduce)
            z = reduce.outputs[0]
        attrs = cand.geometry.attributes()
        if isinstance(factors, lowrank.Tucker2):
            core_w = new_initializer(graph, namer(f"{base}_core_W"),
                                     factors.core.astype(cand.dtype))
            core = make_node("Conv", [z, core_w], attrs, name=namer(f"{base}_core"),
                             namer=namer)
            graph.insert_before(node, core)
            restore_w = new_initializer(
                graph, namer(f"{base}_restore_W"),
                factors.restore.reshape(*factors.restore.shape, *ones).astype(cand.dtype))
            inputs = [core.outputs[0], restore_w]
            if factors.bias is not None:
                inputs.append(new_initializer(graph, namer(f"{base}_restore_B"),
                                              factors.bias.astype(cand.dtype)))
            last = make_node("Conv", inputs, pointwise_conv_attrs(spatial),
                             name=namer(f"{base}_restore"), namer=namer)
            info["rank_out"] = rank.r_out
        else:
            w2 = new_initializer(graph, namer(f"{base}_W"), factors.kernel.astype(cand.dtype))
            inputs = [z, w2]
            if factors.bias is not None:
                inputs.append(new_initializer(graph, namer(f"{base}_B"),
                                              factors.bias.astype(cand.dtype)))
            last = make_node("Conv", inputs, attrs, name=namer(f"{base}_kxk"), namer=namer)
        graph.insert_before(node, last)
        replace_value(node.outputs[0], last.outputs[0])
        graph.remove(node, safe=True)
        info["output"] = last.outputs[0]
        return info

    # ------------------------------------------------------------------ report

    def _measure(self, model: ir.Model, original: ir.Model, candidates: list[Candidate],
                 plan: dict[int, Rank], applied: dict[int, dict]) -> None:
        """Per-layer report rows; with held-out data, each conv's measured output error and
        the model-output error when only that layer is rewritten (its sensitivity)."""
        measured = self._measured_errors(model, candidates, applied)
        sensitivity = self._sensitivities(original, candidates, plan, applied)
        for cand in candidates:
            if cand.index not in applied:
                continue
            info, rank = applied[cand.index], plan[cand.index]
            macs_after = cand.macs_after(rank.r, rank.r_out) if "merged_into" not in info else (
                cand.macs_after(rank.r, rank.r_out)
                - conv_macs(math.prod(cand.in_shape) // cand.channels, rank.r, cand.channels, [1])
                + info["producer_macs_delta"])
            details = {
                "rank": rank.r,
                "channels": cand.channels,
                "estimated_rel_error": cand.spectrum.relative_error(rank.r),
                "kept_energy": float(cand.spectrum.energy()[rank.r - 1]),
            }
            if rank.r_out is not None:
                details["rank_out"] = rank.r_out
            if "merged_into" in info:
                details["merged_into"] = info["merged_into"]
            if cand.index in measured:
                details["measured_rel_error"] = measured[cand.index]
            if cand.index in sensitivity:
                details["sensitivity_rel_error"] = sensitivity[cand.index]
            if self._timer is not None:
                details.update(self._timer(cand.layer, rank.r, rank.r_out).as_details())
            self.report.applied(
                cand.name, "Conv", _plan_line(rank, details),
                macs_before=cand.macs, macs_after=int(macs_after),
                params_before=cand.weight.size + _size(cand.bias),
                params_after=cand.params_after(rank.r, rank.r_out), details=details,
            )

    def _measured_errors(self, model: ir.Model, candidates: list[Candidate],
                         applied: dict[int, dict]) -> dict[int, float]:
        if self.context.holdout is None:
            return {}
        names = {}
        for cand in candidates:
            info = applied.get(cand.index)
            out = info and info["output"]
            # a later layer merged into this restore: its output is no longer comparable
            if out is not None and id(out) not in self._merged_values:
                names[cand.index] = out.name
        if not names:
            return {}
        errs = {i: [0.0, 0.0] for i in names}
        current = self.context.capture(model, sorted(set(names.values())), "holdout")
        reference = self.context.capture(self._original, sorted(
            {c.output_name for c in candidates if c.index in names}), "holdout")
        by_index = {c.index: c for c in candidates}
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

    def _sensitivities(self, original: ir.Model, candidates: list[Candidate],
                       plan: dict[int, Rank], applied: dict[int, dict]) -> dict[int, float]:
        """Model-output rel L2 on held-out data with only this layer factorized (data-free
        factors at the chosen rank, so layers compare on equal terms)."""
        if self.context.holdout is None or not self.options.sensitivity:
            return {}
        data = self.context.holdout.inputs
        reference = runtime.run_all(original, data)
        out = {}
        for cand in candidates:
            if cand.index not in applied:
                continue
            trial = original.clone()
            factors = cand.spectrum.factors(plan[cand.index].r, cand.out_channels,
                                            cand.geometry.kernel, cand.bias)
            self._rewrite(trial, _node_at(trial, cand.index), cand, factors,
                          plan[cand.index], Namer(trial))
            got = runtime.run_all(trial, data)
            out[cand.index] = max(compare_arrays(reference[k], got[k])["rel_l2"]
                                  for k in reference)
        return out

    def _totals(self, candidates: list[Candidate], plan: dict[int, Rank], total: int,
                init: str) -> None:
        rows = [d for d in self.report.decisions if d.applied]
        before = sum(d.macs_before or 0 for d in rows)
        after = sum(d.macs_after or 0 for d in rows)
        self.report.metrics.update({
            "init": init,
            "mode": self.options.mode,
            "layers_rewritten": len(rows),
            "candidates": len(candidates),
            "layer_macs_before": before,
            "layer_macs_after": after,
            "model_macs_before": total,
            "model_macs_removed_share": (before - after) / total if total else 0.0,
        })
        measured = [d.details["measured_rel_error"] for d in rows
                    if "measured_rel_error" in d.details]
        if measured:
            self.report.metrics["max_measured_rel_error"] = max(measured)

    def _timing_totals(self, model_ms: float | None) -> None:
        """Sums of the applied layers' measured times (each timed alone, so they add up only
        approximately to the model's change)."""
        rows = [d for d in self.report.decisions if d.applied and "layer_ms_before" in d.details]
        before = sum(d.details["layer_ms_before"] for d in rows)
        after = sum(d.details["layer_ms_after"] for d in rows)
        self.report.metrics.update({
            "objective": "latency",
            "timing_threads": self.options.threads,
            "layer_ms_before": round(before, 4),
            "layer_ms_after": round(after, 4),
            "layers_timed": self._timer.measurements,
        })
        if model_ms:
            self.report.metrics["model_time_removed_share_est"] = round(
                (before - after) / model_ms, 4)

    # the original model is kept for refit targets and measurements
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._original = model.clone()
        self._unplanned_reason = "rank would not save MACs"
        self._skip_reasons: dict[int, str] = {}
        self._skip_details: dict[int, dict] = {}
        self._timer: conv_timing.ConvTimer | None = None
        self._merged_values: set[int] = set()
        try:
            return super().call(model)
        finally:
            self._original = None


# ------------------------------------------------------------------------------ helpers


def _reduce_refit_cost(cand: Candidate, rank: int) -> float:
    k = math.prod(cand.geometry.kernel)
    return float(rank * cand.channels) ** 2 * k * k


def _slower_reason(timing: conv_timing.LayerTiming) -> str:
    return (f"not faster in onnxruntime (measured {timing.speedup:.2f}x: "
            f"{timing.before_ms:.3f} -> {timing.after_ms:.3f} ms)")


def _plan_line(rank: Rank, details: dict) -> str:
    """The decision as the dry run prints it: rank, estimated and measured errors."""
    parts = [f"rank {rank.r}" + (f"->{rank.r_out}" if rank.r_out else "")]
    parts.append(f"est. err {details['estimated_rel_error']:.3f}")
    if "measured_rel_error" in details:
        parts.append(f"measured {details['measured_rel_error']:.3f}")
    if "sensitivity_rel_error" in details:
        parts.append(f"sensitivity {details['sensitivity_rel_error']:.3f}")
    if "merged_into" in details:
        parts.append(f"merged into {details['merged_into']}")
    if "layer_ms_before" in details:
        parts.append(f"{details['layer_ms_before']:.3f} -> {details['layer_ms_after']:.3f} ms "
                     f"(x{details['layer_speedup']:.2f})")
    return ", ".join(parts)


def _node_at(model: ir.Model, index: int) -> ir.Node:
    return list(model.graph)[index]


def _size(array: np.ndarray | None) -> int:
    return 0 if array is None else int(array.size)


def _descendants(model: ir.Model, index: int) -> set[int]:
    """Positions of the nodes downstream of the node at `index` (graph order is topological)."""
    nodes = list(model.graph)
    position = {id(n): i for i, n in enumerate(nodes)}
    seen: set[int] = set()
    stack = [nodes[index]]
    while stack:
        node = stack.pop()
        for out in node.outputs:
            for use in out.uses():
                i = position.get(id(use.node))
                if i is not None and i not in seen:
                    seen.add(i)
                    stack.append(use.node)
    return seen


def _independent_groups(model: ir.Model, indices: list[int]) -> list[list[int]]:
    """Consecutive layers (topological order) none of which feeds another: one capture run
    serves them all."""
    groups: list[list[int]] = []
    downstream: set[int] = set()
    for i in sorted(indices):
        if groups and i not in downstream:
            groups[-1].append(i)
        else:
            groups.append([i])
            downstream = set()
        downstream |= _descendants(model, i)
    return groups


__all__ = ["BottleneckOptions", "BottleneckPass"]
