"""Allocation on measured sensitivity (AIMET-style, with a global greedy allocator).

For each candidate layer, over a rank grid the spectrum prunes (`measured_grid`), the model's
task error on held-out data with only that layer rewritten is measured once and cached
(`rewriter.lowrank_sensitivity`). Those errors, not the spectrum, drive the global allocation by
least error² per MAC saved (`measured_choices`); a per-layer cap removes ranks that wreck a
layer. The whole rewritten model is then measured, and where it is worse than the per-layer sum
predicted, the worst layers are backed off one rank step at a time (`back_off`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from rewriter import lowrank
from rewriter.lowrank_methods import Method, Rank, rank_grid
from rewriter.lowrank_plan import Estimate, Plan
from rewriter.lowrank_select import ConvLayer

#: The spectrum prunes the grid: ranks predicted worse than this are not measured.
PRUNE_ESTIMATE = 0.7
#: The whole model may be this many times worse than the per-layer errors predict.
MISJUDGED = 1.5


def measured_grid(layers: Sequence[ConvLayer], methods: Sequence[Method], multiple: int,
                  estimate: Estimate, per_method: int) -> dict[int, list[Rank]]:
    """Per layer, up to `per_method` ranks of each method, evenly spread over the ranks the
    spectrum does not rule out (largest first)."""
    grid: dict[int, list[Rank]] = {}
    for layer in layers:
        ranks: list[Rank] = []
        for method in methods:
            if method.refusal(layer) is not None:
                continue
            options = [rk for rk in rank_grid(layer, method, multiple)
                       if estimate(layer, rk) <= PRUNE_ESTIMATE]
            if len(options) > per_method:
                picks = np.linspace(0, len(options) - 1, per_method).round().astype(int)
                options = [options[i] for i in sorted(set(picks.tolist()))]
            ranks.extend(options)
        grid[layer.index] = ranks
    return grid


def measured_choices(layers: Sequence[ConvLayer], methods: Sequence[Method],
                     grid: Mapping[int, Sequence[Rank]],
                     errors: Mapping[tuple[int, Rank], float], cap: float | None
                     ) -> tuple[list[lowrank.LayerChoices], dict[int, str]]:
    """Allocation choices from measured errors; ranks above `cap` are left out, and a layer
    with none left gets the reason."""
    method_of = {m.name: m for m in methods}
    choices, reasons = [], {}
    for layer in layers:
        ranks = [rk for rk in grid.get(layer.index, ())
                 if cap is None or errors[(layer.index, rk)] <= cap]
        if grid.get(layer.index) and not ranks:
            best = min(errors[(layer.index, rk)] for rk in grid[layer.index])
            reasons[layer.index] = (f"every rank above max-layer-error {cap:g} "
                                    f"(best measured {best:.4g})")
        choices.append(lowrank.LayerChoices(
            key=layer.index, ranks=ranks,
            macs_saved=[layer.macs - method_of[rk.method].macs_after(layer, rk) for rk in ranks],
            error_sq=[errors[(layer.index, rk)] ** 2 for rk in ranks]))
    return choices, reasons


def predicted_error(plan: Plan, errors: Mapping[tuple[int, Rank], float]) -> float:
    """The model error the per-layer measurements predict (independent errors add in squares)."""
    return math.sqrt(sum(errors[(i, rk)] ** 2 for i, rk in plan.ranks.items()))


def back_off(plan: Plan, choices: Sequence[lowrank.LayerChoices],
             errors: Mapping[tuple[int, Rank], float], measure: Callable[[Plan], float],
             steps: int, log: Callable[[str], None] = lambda m: None) -> tuple[Plan, float]:
    """Measure the whole plan; while it is more than `MISJUDGED` times worse than predicted,
    move the layer with the largest measured error to its next larger measured rank (or leave
    it alone). Returns the plan and its measured error; notes say what changed."""
    by_key = {c.key: c for c in choices}
    actual = measure(plan)
    plan.metrics["whole_model_error"] = actual
    plan.metrics["predicted_error"] = predicted_error(plan, errors)
    moved = []
    for _ in range(steps):
        predicted = predicted_error(plan, errors)
        if not plan.ranks or actual <= MISJUDGED * max(predicted, 1e-12):
            break
        index = max(plan.ranks, key=lambda i: errors[(i, plan.ranks[i])])
        layer = by_key[index]
        now = plan.ranks[index]
        saving = layer.macs_saved[layer.ranks.index(now)]
        larger = [(s, rk) for s, rk in zip(layer.macs_saved, layer.ranks, strict=True)
                  if s < saving]
        if larger:
            plan.ranks[index] = max(larger, key=lambda t: t[0])[1]
        else:
            del plan.ranks[index]
            plan.reasons[index] = "backed off: the whole model was worse than measured alone"
        moved.append(index)
        actual = measure(plan)
        log(f"back-off: layer #{index} {now} -> {plan.ranks.get(index)}: error {actual:.4g}")
    if moved:
        plan.notes.append(f"whole-model error {plan.metrics['whole_model_error']:.4g} was above "
                          f"{MISJUDGED}x the per-layer prediction "
                          f"{plan.metrics['predicted_error']:.4g}: backed off {len(moved)} "
                          f"step(s), now {actual:.4g}")
        plan.metrics["backed_off"] = len(moved)
    plan.metrics["whole_model_error_final"] = actual
    return plan, actual
