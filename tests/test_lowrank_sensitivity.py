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
