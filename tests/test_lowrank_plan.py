"""Rank planning as plain data: rules, a global target with its unreachable note, the auto
bisection against a caller's test, and the Tucker-2 estimate counting both truncations."""

from __future__ import annotations

import dataclasses

import numpy as np

from rewriter import load
from rewriter.lowrank import svd_spectrum
from rewriter.lowrank_methods import METHODS, Rank
from rewriter.lowrank_plan import (
    RankRule,
    auto_cut,
    drop_unprofitable,
    layer_choices,
    plan_by_rule,
    plan_for_target,
    spectral_estimate,
)
from rewriter.lowrank_select import select_convs
from tests.builders import conv_model


def _layer(seed: int = 0, channels: int = 32, out: int = 32):
    (layer,) = select_convs(load(conv_model([1, channels, 10, 10], out, [3, 3], seed=seed,
                                            pads=[1] * 4))).layers
    return layer


def _spectra(layers):
    return {(x.index, "channel"): svd_spectrum(x.weight) for x in layers}


def test_rules_give_one_rank_per_layer():
    layer = _layer()
    spectra = _spectra([layer])
    assert plan_by_rule([layer], METHODS["in"], spectra, RankRule()).ranks == {0: Rank(16)}
    assert plan_by_rule([layer], METHODS["in"], spectra, RankRule(rank=4)).ranks == {0: Rank(4)}
    tucker = plan_by_rule([layer], METHODS["in-out"], spectra, RankRule(ratio=0.25))
    assert tucker.ranks == {0: Rank(8, 8, "in-out")}
    full = plan_by_rule([layer], METHODS["in"], spectra, RankRule(energy=1.0, multiple=1))
    assert full.ranks == {} and full.reason(0) == "rank would not save MACs"


def test_target_allocates_and_says_when_it_cannot():
    layer = _layer()
    estimate = spectral_estimate(_spectra([layer]))
    choices = [layer_choices(layer, [METHODS["in"]], 8, estimate)]
    plan = plan_for_target(choices, layer.macs, 0.3)
    saved = layer.macs - METHODS["in"].macs_after(layer, plan.ranks[0])
    assert saved >= 0.3 * layer.macs and not plan.notes
    impossible = plan_for_target(choices, layer.macs, 0.99)
    assert impossible.notes and impossible.notes[0].startswith("target 99% not reachable")


def test_auto_cut_bisects_to_the_largest_accepted_cut():
    layer = _layer()
    estimate = spectral_estimate(_spectra([layer]))
    choices = [layer_choices(layer, [METHODS["in"]], 1, estimate)]
    tried = []

    def accept(plan):  # accept while the layer keeps at least 12 of its 32 channels
        tried.append(plan.ranks.get(0))
        return not plan.ranks or plan.ranks[0].r >= 12

    plan, cut = auto_cut(choices, layer.macs, 8, accept)
    assert plan.ranks[0].r >= 12 and 0 < cut < 1
    assert tried[0].r < 12  # the first try is the most there is
    assert plan.default_reason == "not needed for the auto target"


def test_tucker_estimate_counts_the_output_truncation():
    layer = _layer(out=64)
    estimate = spectral_estimate(_spectra([layer]))
    only_in = estimate(layer, Rank(16))
    both = estimate(layer, Rank(16, 16, "in-out"))
    assert both > only_in
    out_side = svd_spectrum(np.ascontiguousarray(
        layer.weight.transpose(1, 0, 2, 3))).relative_error(16)  # [C, O·K] of the transpose
    # Tucker-2 truncates both modes: no better than either truncation alone, no worse than
    # truncating them one after the other (the HOSVD bound that its ALS fit improves on).
    assert max(only_in, out_side) - 1e-9 <= both <= np.hypot(only_in, out_side) + 1e-9


def test_a_layer_whose_task_cost_is_out_of_proportion_to_its_saving_is_left_alone():
    cheap, costly = _layer(0), _layer(1)
    costly = dataclasses.replace(costly, index=1)
    plan = plan_by_rule([cheap, costly], METHODS["in"], _spectra([cheap, costly]), RankRule())
    saved = {i: 1000.0 for i in plan.ranks}
    # each saves 10% of a 10,000-MAC model: 0.005 error pays (0.05 per unit), 0.02 does not
    out = drop_unprofitable(plan, {0: 0.005, 1: 0.02}, saved, 10_000, 0.1)
    assert set(out.ranks) == {0}
    assert out.reason(1).startswith("does not pay: task error 0.02 for 10.00% of the model's")
    assert out.details[1]["task_error"] == 0.02
