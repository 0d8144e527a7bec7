"""Allocation on measured errors: the spectrum prunes the grid, the cap removes wrecking ranks
(with a reason), and back-off raises the worst layer's rank when the whole model is worse than
the per-layer measurements predicted."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from rewriter import load
from rewriter.lowrank import svd_spectrum
from rewriter.lowrank_allocate import back_off, measured_choices, measured_grid
from rewriter.lowrank_methods import METHODS, Rank
from rewriter.lowrank_plan import plan_for_target, spectral_estimate
from rewriter.lowrank_select import select_convs
from tests.builders import make_model


def _layers():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W0"], ["a"], name="a", pads=[1] * 4),
             helper.make_node("Conv", ["a", "W1"], ["y"], name="b", pads=[1] * 4)]
    inits = [numpy_helper.from_array((0.1 * rng.standard_normal((32, 32, 3, 3))).astype(
        np.float32), n) for n in ("W0", "W1")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return select_convs(load(make_model(nodes, [x], [y], inits))).layers


def _estimate(layers):
    spectra = {}
    for x in layers:
        spectra[(x.index, "channel")] = svd_spectrum(x.weight)
    return spectral_estimate(spectra)


def test_grid_is_pruned_and_spread_per_method():
    layers = _layers()
    grid = measured_grid(layers, [METHODS["in"], METHODS["spatial"]], 8, lambda x, rk: 0.1, 2)
    assert all(len(ranks) <= 4 for ranks in grid.values())
    assert {rk.method for rk in grid[layers[0].index]} == {"in", "spatial"}
    none = measured_grid(layers, [METHODS["in"]], 8, lambda x, rk: 0.9, 3)
    assert all(not ranks for ranks in none.values())  # all predicted past the prune limit


def test_cap_removes_ranks_and_names_the_layer_it_empties():
    layers = _layers()
    a, b = (x.index for x in layers)
    grid = {a: [Rank(24), Rank(8)], b: [Rank(24), Rank(8)]}
    errors = {(a, Rank(24)): 0.01, (a, Rank(8)): 0.2, (b, Rank(24)): 0.3, (b, Rank(8)): 0.5}
    choices, reasons = measured_choices(layers, [METHODS["in"]], grid, errors, cap=0.1)
    assert [c.ranks for c in choices] == [[Rank(24)], []]
    assert reasons == {b: "every rank above max-layer-error 0.1 (best measured 0.3)"}
    plan = plan_for_target(choices, sum(x.macs for x in layers), 0.6)
    assert plan.notes and "not reachable" in plan.notes[0]  # stops at what the cap allows
    assert plan.ranks == {a: Rank(24)}


def test_back_off_raises_the_worst_layer_when_the_sum_misjudged():
    layers = _layers()
    a, b = (x.index for x in layers)
    grid = {a: [Rank(24), Rank(16), Rank(8)], b: [Rank(24), Rank(16), Rank(8)]}
    errors = {(i, rk): 0.01 * (32 - rk.r) / 8 for i in (a, b) for rk in grid[i]}
    errors[(b, Rank(8))] = 0.05
    choices, _ = measured_choices(layers, [METHODS["in"]], grid, errors, None)
    plan = plan_for_target(choices, sum(x.macs for x in layers), 0.6)
    assert plan.ranks[b] == Rank(8)

    def whole(p):  # layer b at rank 8 interacts badly: the model is far worse than predicted
        return 1.0 if p.ranks.get(b) == Rank(8) else 0.05

    plan, final = back_off(plan, choices, errors, whole, steps=3)
    assert plan.ranks[b] == Rank(16) and final == 0.05
    assert plan.metrics["backed_off"] == 1 and "backed off 1 step" in plan.notes[-1]


def test_no_back_off_when_the_prediction_holds():
    layers = _layers()
    a = layers[0].index
    errors = {(a, Rank(16)): 0.1}
    choices, _ = measured_choices(layers[:1], [METHODS["in"]], {a: [Rank(16)]}, errors, None)
    plan = plan_for_target(choices, layers[0].macs, 0.2)
    plan, final = back_off(plan, choices, errors, lambda p: 0.12, steps=3)
    assert plan.ranks == {a: Rank(16)} and final == 0.12 and "backed_off" not in plan.metrics


def test_spectral_estimate_is_usable_for_pruning():
    layers = _layers()
    grid = measured_grid(layers, [METHODS["in"]], 8, _estimate(layers), 10)
    assert all(grid[x.index] for x in layers)
