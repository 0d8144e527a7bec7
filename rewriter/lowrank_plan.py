"""Rank planning for low-rank passes: which layers get which method and rank, and why not.

A plan is plain data (`Plan`): per layer the chosen `Rank`, per layer left alone the reason,
and the notes and metrics the planning produced. Rules: a fixed `ratio`, `rank` or `energy` per
layer, or a global `target` share of the model's cost allocated by least error per unit saved
(`rewriter.lowrank.allocate_ranks`); the cost is MACs, or measured milliseconds with
`objective=latency` (see `timed_choices`). `auto_cut` bisects the target against a caller's test.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from rewriter import conv_timing, lowrank
from rewriter.cost import round_rank
from rewriter.lowrank_methods import Method, Rank, rank_grid, spectrum_key
from rewriter.lowrank_select import ConvLayer

DEFAULT_RATIO = 0.5
#: Ranks rounded to multiples of this (runtimes' kernels are faster on such widths).
DEFAULT_ROUND = 8

#: (layer, rank) -> estimated relative error of the layer (or of the model) at that rank.
Estimate = Callable[[ConvLayer, Rank], float]


@dataclass
class Plan:
    """Ranks per layer index; `reasons`/`details` for layers left alone (else `default_reason`)."""

    ranks: dict[int, Rank] = field(default_factory=dict)
    default_reason: str = "rank would not save MACs"
    reasons: dict[int, str] = field(default_factory=dict)
    details: dict[int, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    def reason(self, index: int) -> str:
        return self.reasons.get(index, self.default_reason)


@dataclass(frozen=True)
class RankRule:
    """A per-layer rule: exactly one of ratio, rank, energy (ratio 0.5 when none)."""

    ratio: float | None = None
    rank: int | None = None
    energy: float | None = None
    multiple: int = DEFAULT_ROUND


def spectral_estimate(spectra: Mapping[tuple[int, str], lowrank.Spectrum]) -> Estimate:
    """The layer's relative error predicted by its (whitened) spectrum."""
    def estimate(layer, rank) -> float:
        spectrum = spectra[(layer.index, spectrum_key(rank))]
        if rank.r_out is None:
            return spectrum.relative_error(rank.r)
        return spectrum.in_out_error(rank.r, rank.r_out, layer.out_channels)

    return estimate


def plan_by_rule(layers: Sequence[ConvLayer], method: Method,
                 spectra: Mapping[tuple[int, str], lowrank.Spectrum], rule: RankRule) -> Plan:
    """One rank per layer from the rule; ranks that would not save MACs are left out."""
    plan = Plan()
    for layer in layers:
        full = method.full_rank(layer)
        if rule.rank is not None:
            r = min(rule.rank, full)
        elif rule.energy is not None:
            spectrum = spectra[(layer.index, spectrum_key(method.name))]
            r = lowrank.round_up(lowrank.rank_for_energy(spectrum, rule.energy), rule.multiple,
                                 full)
        else:
            ratio = rule.ratio if rule.ratio is not None else DEFAULT_RATIO
            r = round_rank(ratio * full, rule.multiple, full)
        rank = method.rank(layer, r, rule.multiple)
        if r < full and method.macs_after(layer, rank) < layer.macs:
            plan.ranks[layer.index] = rank
    return plan


def drop_unprofitable(plan: Plan, errors: Mapping[int, float], saved: Mapping[int, float],
                      total_macs: float, max_cost: float) -> Plan:
    """Without a target: leave alone the planned layers whose measured task error (that layer
    rewritten alone) is out of proportion to the share of the model's MACs it saves, i.e. above
    `max_cost` per unit of share (0.1: the whole 0.01 fidelity budget for 10% of the MACs)."""
    for index in [i for i in plan.ranks if i in errors]:
        error, share = errors[index], saved[index] / max(total_macs, 1e-12)
        cost = error / max(share, 1e-12)
        if cost > max_cost:
            rank = plan.ranks.pop(index)
            plan.reasons[index] = (
                f"does not pay: task error {error:.3g} for {share:.2%} of the model's MACs "
                f"({cost:.3g} per unit saved > max-cost-per-saving {max_cost:g})")
            plan.details[index] = {"rank": rank.r, "task_error": error,
                                   "macs_share_saved": round(share, 6)}
    return plan


def layer_choices(layer: ConvLayer, methods: Sequence[Method], multiple: int,
                  estimate: Estimate, ranks: Sequence[Rank] | None = None,
                  gains: Sequence[float] | None = None) -> lowrank.LayerChoices:
    """A layer's options for global allocation over every method's rank grid (or `ranks` with
    their `gains`, e.g. measured ms): saving and estimated error² of each."""
    method_of = {m.name: m for m in methods}
    if ranks is None:
        ranks = [rk for m in methods for rk in rank_grid(layer, m, multiple)]
    if gains is None:
        gains = [layer.macs - method_of[rk.method].macs_after(layer, rk) for rk in ranks]
    return lowrank.LayerChoices(key=layer.index, ranks=list(ranks), macs_saved=list(gains),
                                error_sq=[estimate(layer, rk) ** 2 for rk in ranks])


def plan_for_target(choices: Sequence[lowrank.LayerChoices], budget: float, target: float,
                    unit: str = "MACs") -> Plan:
    """Remove `target` of `budget` at least total (weighted) error; says when it cannot."""
    alloc = lowrank.allocate_ranks([c for c in choices if c.ranks], target * budget)
    plan = Plan(ranks=dict(alloc.ranks), default_reason="target met without this layer")
    plan.metrics["planned_saving"] = alloc.macs_saved
    if not alloc.reached:
        plan.notes.append(f"target {target:.0%} not reachable: at most "
                          f"{alloc.macs_saved / max(budget, 1e-12):.1%} of the {unit} removed")
    return plan


def most_saving(choices: Sequence[lowrank.LayerChoices], budget: float) -> float:
    """The largest share of `budget` the choices can remove."""
    alloc = lowrank.allocate_ranks([c for c in choices if c.ranks], budget)
    return alloc.macs_saved / max(budget, 1e-12)


def auto_cut(choices: Sequence[lowrank.LayerChoices], budget: float, steps: int,
             accept: Callable[[Plan], bool], log: Callable[[str], None] = lambda m: None
             ) -> tuple[Plan, float]:
    """Bisect the cut for the largest one whose plan `accept`s (first try: the most there is).
    Returns the accepted plan (empty when none) and its cut."""
    lo, hi = 0.0, most_saving(choices, budget)
    best = Plan(default_reason="not needed for the auto target")
    for step in range(steps):
        mid = hi if step == 0 else (lo + hi) / 2
        plan = plan_for_target(choices, budget, mid)
        ok = accept(plan)
        log(f"auto: cut {mid:.1%} -> {'kept' if ok else 'rejected'}")
        if ok:
            lo, best = mid, plan
            best.notes.clear()
            best.default_reason = "not needed for the auto target"
            if step == 0:
                break
        else:
            hi = mid
    return best, lo


# ------------------------------------------------------------------------------ objective=latency


def slower_reason(timing: conv_timing.LayerTiming) -> str:
    return (f"not faster in onnxruntime (measured {timing.speedup:.2f}x: "
            f"{timing.before_ms:.3f} -> {timing.after_ms:.3f} ms)")


def timed_choices(layer: ConvLayer, ranks: Sequence[Rank], timer: conv_timing.ConvTimer,
                  min_gain: float, grid: int) -> tuple[list[Rank], list[float], str | None]:
    """A grid of `grid` ranks, each timed; ranks saving less than `min_gain` of the layer's
    time drop out. Returns kept ranks, their ms saved, and the reason when none is kept."""
    ranks = list(ranks)
    if len(ranks) > grid:
        picks = np.linspace(0, len(ranks) - 1, grid).round().astype(int)
        ranks = [ranks[i] for i in sorted(set(picks.tolist()))]
    kept, gains = [], []
    for rk in ranks:
        timing = timer(conv_layer_timing(layer), rk.r, rk.r_out)
        if timing.saved_share >= min_gain:
            kept.append(rk)
            gains.append(timing.saved_ms)
    reason = None
    if ranks and not kept:
        reason = slower_reason(timer(conv_layer_timing(layer), ranks[-1].r, ranks[-1].r_out))
    return kept, gains, reason


def drop_slower(layers: Sequence[ConvLayer], plan: Plan, timer: conv_timing.ConvTimer,
                min_gain: float) -> Plan:
    """Without a target: keep the planned layers whose measured time drops enough."""
    for layer in layers:
        rank = plan.ranks.get(layer.index)
        if rank is None:
            continue
        timing = timer(conv_layer_timing(layer), rank.r, rank.r_out)
        if timing.saved_share < min_gain:
            del plan.ranks[layer.index]
            plan.reasons[layer.index] = slower_reason(timing)
            plan.details[layer.index] = {"rank": rank.r, **timing.as_details()}
    return plan


def conv_layer_timing(layer: ConvLayer) -> conv_timing.ConvLayer:
    """What a layer's onnxruntime time depends on."""
    return conv_timing.ConvLayer(layer.in_shape, layer.out_channels, layer.geometry,
                                 layer.bias is not None, layer.dtype.name)
