"""Trials run from one layer down on captured activations, and captures that run only what the
captured values need: the same numbers as the whole model, on fewer nodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter import load, runtime
from rewriter.downstream import cut_below, feeds_in_chunks
from rewriter.graph import Namer
from rewriter.lowrank_emit import emit
from rewriter.lowrank_fit import start_factors
from rewriter.lowrank_methods import METHODS
from rewriter.lowrank_select import select_convs
from rewriter.lowrank_sensitivity import rewritten_outputs
from tests.builders import make_model

DETECTOR = Path(__file__).resolve().parents[1] / "models" / "trained" / "detector.onnx"
CALIB = DETECTOR.with_name("detector_calib.npz")


@pytest.fixture(scope="module")
def detector():
    if not DETECTOR.exists():
        pytest.skip("models/trained/detector.onnx missing")
    with np.load(CALIB) as data:
        images = data["images"][:6]
    return load(DETECTOR), {"images": images}


def _halved(layer):
    method = METHODS["in"]
    rank = method.rank(layer, max(8, method.full_rank(layer) // 2), 8)
    return start_factors(layer, {(layer.index, "channel"): method.spectrum(layer, None, 0.0)},
                         rank)


def test_a_cut_trial_gives_the_whole_models_outputs(detector):
    """Backbone, neck and head convs of a YOLOv8-layout detector (C2f splits sized by Shape,
    skip concats, a decode whose reshapes read the batch size from another level): the cut
    holds fewer nodes, is fed only batch-major data, and reproduces the whole model's trial."""
    model, inputs = detector
    reference = runtime.run_all(model, inputs)
    layers = select_convs(model).layers
    for layer in (layers[0], layers[len(layers) // 2], layers[-1]):
        factors = _halved(layer)
        whole = rewritten_outputs(model, [(layer, factors)], inputs,
                                  lambda m, n, x, f, namer: emit(m, n, x, f, namer))
        cut = cut_below(model, layer.index)
        assert cut is not None and len(list(cut.model.graph)) < len(list(model.graph))
        feeds = cut.feeds(model, inputs)
        assert feeds and all(len(v) == 6 for v in feeds.values())
        trial = cut.model.clone()
        emit(trial, list(trial.graph)[cut.index], layer, factors, Namer(trial))
        got = cut.outputs(trial, feeds, reference)
        for name, expected in whole.items():
            np.testing.assert_allclose(got[name], expected, rtol=1e-4,
                                       atol=1e-5 * float(np.abs(expected).max()))
        assert not np.allclose(got["output0"], reference["output0"])  # the rewrite is in it


@pytest.mark.parametrize("budget", [1, 1 << 40])
def test_cuts_fed_together_get_the_feeds_each_would_capture_alone(detector, monkeypatch, budget):
    """One capture run per chunk of cuts (a budget of 1 byte: one per cut; a huge one: one for
    all): every cut's feeds equal its own capture, and the chunking sets the number of runs."""
    model, inputs = detector
    layers = select_convs(model).layers
    cuts = [cut_below(model, layer.index) for layer in layers[:5]]
    alone = [cut.feeds(model, inputs) for cut in cuts]
    runs = []
    real_capture = runtime.capture
    monkeypatch.setattr(runtime, "capture",
                        lambda *a, **k: runs.append(len(a[2]["images"])) or real_capture(*a, **k))
    together = list(feeds_in_chunks(cuts, model, inputs, budget))
    assert [sorted(f) for f in together] == [sorted(f) for f in alone]
    for got, expected in zip(together, alone, strict=True):
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])
    full_runs = [n for n in runs if n == len(inputs["images"])]  # not the one-sample probe
    assert len(full_runs) == (len(cuts) if budget == 1 else 1)


def test_only_outputs_computes_the_captured_values_on_their_ancestors(detector):
    model, inputs = detector
    early = list(model.graph)[select_convs(model).layers[0].index].inputs[0].name
    pruned = runtime.only_outputs(model, [early])
    assert [v.name for v in pruned.graph.outputs] == [early]
    assert len(list(pruned.graph)) < len(list(model.graph)) // 4
    expected = runtime.run_all(runtime.with_outputs(model, [early]), inputs)[early]
    np.testing.assert_array_equal(runtime.run_all(pruned, inputs)[early], expected)


def test_a_graph_with_subgraphs_is_not_cut():
    """An If branch may read outer values its node does not list: run such models whole."""
    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((8, 8, 3, 3)).astype(np.float32), "W")
    cond = numpy_helper.from_array(np.array(True), "cond")
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    branch = helper.make_graph([helper.make_node("Relu", ["c"], ["t"])], "b", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch,
                              else_branch=branch)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])
    model = load(make_model(nodes, [x], [out], [weight, cond]))
    assert cut_below(model, 1) is None
