"""Single-layer trials: the model error with only one layer rewritten, measured once per
(model, data, layer, rank, init) and then served from the cache without a new session."""

from __future__ import annotations

import numpy as np

from rewriter import load, runtime
from rewriter.graph import Namer
from rewriter.lowrank import svd_spectrum
from rewriter.lowrank_emit import emit
from rewriter.lowrank_fit import start_factors
from rewriter.lowrank_methods import Rank
from rewriter.lowrank_select import select_convs
from rewriter.lowrank_sensitivity import clear_cache, model_error, single_layer_errors
from tests.builders import channel_low_rank_kernel, conv_model, with_initializer


def _setup():
    proto = conv_model([1, 32, 8, 8], 32, [3, 3], pads=[1] * 4)
    proto = with_initializer(proto, "W", channel_low_rank_kernel(np.random.default_rng(0),
                                                                 32, 32, (3, 3), 8))
    model = load(proto)
    layers = select_convs(model).layers
    spectra = {(x.index, "channel"): svd_spectrum(x.weight) for x in layers}
    inputs = {"x": np.random.default_rng(1).standard_normal((4, 32, 8, 8)).astype(np.float32)}
    return model, layers, spectra, inputs


def _emit(m: object, node, layer, factors, namer: Namer):
    return emit(m, node, layer, factors, namer)


def test_errors_follow_the_rank_and_are_cached():
    clear_cache()
    model, layers, spectra, inputs = _setup()
    reference = runtime.run_all(model, inputs)
    grid = {layers[0].index: [Rank(16), Rank(8), Rank(4)]}

    def run():
        return single_layer_errors(model, layers, grid,
                                   lambda x, rk: start_factors(x, spectra, rk), inputs,
                                   reference, _emit, "svd")

    opened = runtime.SESSIONS_OPENED
    errors = run()
    assert runtime.SESSIONS_OPENED - opened == 3  # one trial session per rank
    i = layers[0].index
    assert errors[(i, Rank(16))] < 1e-5 and errors[(i, Rank(8))] < 1e-5  # the kernel's rank
    assert errors[(i, Rank(4))] > 0.1
    opened = runtime.SESSIONS_OPENED
    assert run() == errors
    assert runtime.SESSIONS_OPENED == opened  # served from the cache


def test_model_error_is_zero_for_identical_outputs_and_grows_with_the_difference():
    ref = {"y": np.linspace(-1, 1, 100).reshape(1, 100).astype(np.float32)}
    assert model_error(ref, ref) == 0.0
    small = model_error(ref, {"y": ref["y"] * 1.01})
    large = model_error(ref, {"y": ref["y"] * 1.5})
    assert 0 < small < large


def _two_conv_model():
    """relu(conv3x3) -> conv3x3: the second conv's trials run on a cut fed from a capture."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(5)
    w = lambda o, c: (rng.standard_normal((o, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "W0"], ["a"], name="first", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "W1"], ["y"], name="second", pads=[1] * 4)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", 1, ["N", 16, 8, 8])],
        [helper.make_tensor_value_info("y", 1, ["N", 32, 8, 8])],
        [numpy_helper.from_array(w(32, 16), "W0"), numpy_helper.from_array(w(32, 32), "W1")])
    return load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_a_layers_ranks_share_one_session_and_match_a_fresh_emission():
    """Weights fed as inputs: one trial session serves every rank of a method, and each rank's
    outputs are those of the model rewritten and run on its own (stale weights would not be)."""
    from rewriter.lowrank_sensitivity import rewritten_outputs

    clear_cache()
    model = _two_conv_model()
    layers = [x for x in select_convs(model).layers if x.name == "second"]
    spectra = {(x.index, "channel"): svd_spectrum(x.weight) for x in layers}
    inputs = {"x": np.random.default_rng(2).standard_normal((6, 16, 8, 8)).astype(np.float32)}
    reference = runtime.run_all(model, inputs)
    ranks = [Rank(24), Rank(12), Rank(4)]
    seen: dict = {}

    def metric(ref, got) -> float:
        seen[len(seen)] = got["y"]
        return model_error(ref, got)

    opened = runtime.SESSIONS_OPENED
    errors = single_layer_errors(model, layers, {layers[0].index: ranks},
                                 lambda x, rk: start_factors(x, spectra, rk), inputs, reference,
                                 _emit, "svd", metric)
    assert runtime.SESSIONS_OPENED - opened == 2  # the capture and one trial session
    for k, rank in enumerate(reversed(ranks)):  # the most-saving rank is measured first
        fresh = rewritten_outputs(model, [(layers[0], start_factors(layers[0], spectra, rank))],
                                  inputs, _emit)
        np.testing.assert_allclose(seen[k], fresh["y"], rtol=1e-5, atol=1e-5)
        assert np.isclose(errors[(layers[0].index, rank)], model_error(reference, fresh),
                          rtol=1e-4)
    assert len({round(e, 6) for e in errors.values()}) == 3  # three different ranks


def test_a_sweep_over_budget_measures_on_a_spread_subset_never_below_the_floor():
    from rewriter.lowrank_sensitivity import SWEEP_MACS, spread, sweep_samples, sweep_subset

    assert sweep_samples(100, SWEEP_MACS / 200, 16) == 100  # fits: all of them
    assert sweep_samples(100, SWEEP_MACS / 40, 16) == 40
    assert sweep_samples(100, SWEEP_MACS, 16) == 16  # the floor
    assert sweep_samples(10, SWEEP_MACS, 16) == 10
    assert sweep_samples(100, 1.0, 16, requested=7) == 7
    assert spread(10, 4).tolist() == [0, 3, 6, 9]  # both ends: class-sorted data keeps classes
    inputs = {"x": np.arange(10.0)[:, None]}
    sub_in, sub_ref = sweep_subset(inputs, {"y": np.arange(10.0) * 2, "s": np.float32(3)}, 4)
    assert sub_in["x"][:, 0].tolist() == [0, 3, 6, 9]
    assert sub_ref["y"].tolist() == [0, 6, 12, 18] and sub_ref["s"] == 3


def test_larger_ranks_of_a_method_whose_cheapest_rank_is_negligible_are_not_run():
    """The most-saving rank's error bounds the larger ones where it is below `negligible`;
    without the threshold (the report's per-layer check) every rank is measured."""
    clear_cache()
    model, layers, spectra, inputs = _setup()
    reference = runtime.run_all(model, inputs)
    i = layers[0].index
    grid = {i: [Rank(16), Rank(12), Rank(8)]}  # the kernel has rank 8: all are ~exact
    runs = []

    def metric(ref, got) -> float:
        runs.append(1)
        return model_error(ref, got)

    def errors(negligible: float) -> dict:
        return single_layer_errors(model, layers, grid,
                                   lambda x, rk: start_factors(x, spectra, rk), inputs,
                                   reference, _emit, "svd", metric, negligible=negligible)

    bounded = errors(1e-3)
    assert len(runs) == 1 and bounded[(i, Rank(8))] < 1e-5
    assert bounded[(i, Rank(16))] == bounded[(i, Rank(12))] == bounded[(i, Rank(8))]
    measured = errors(0.0)
    assert len(runs) == 3 and measured[(i, Rank(8))] == bounded[(i, Rank(8))]
    grid = {i: [Rank(16), Rank(8), Rank(4)]}  # rank 4 is not negligible: all measured
    runs.clear()
    clear_cache()
    errors(1e-3)
    assert len(runs) == 3
