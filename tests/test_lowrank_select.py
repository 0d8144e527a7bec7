"""Candidate selection shared by the low-rank passes and `--analyze`: reasons, defaults, and
the same answer from the pass, its dry run and the analysis."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import rewriter
from rewriter import load
from rewriter.lowrank_select import DEFAULT_MIN_CHANNELS, SelectRules, select_convs
from rewriter.pipeline import rewrite
from tests.builders import conv_model, make_model


def _stack():
    """4-channel 3x3 conv (below the default min-channels), then a 16-channel one, then a
    grouped one."""
    rng = np.random.default_rng(0)
    t = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "W0"], ["a"], name="thin", pads=[1] * 4),
             helper.make_node("Conv", ["a", "W1"], ["b"], name="wide", pads=[1] * 4),
             helper.make_node("Conv", ["b", "W2"], ["y"], name="grouped", group=4, pads=[1] * 4)]
    inits = [numpy_helper.from_array(a, n) for n, a in
             [("W0", t(16, 4, 3, 3)), ("W1", t(16, 16, 3, 3)), ("W2", t(16, 4, 3, 3))]]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 12, 12])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make_model(nodes, [x], [y], inits)


def test_reasons_and_candidates():
    selection = select_convs(load(_stack()))
    assert [layer.name for layer in selection.layers] == ["wide"]
    reasons = {s.name: s.reason for s in selection.skipped}
    assert reasons == {"thin": f"below min-channels (4 < {DEFAULT_MIN_CHANNELS})",
                       "grouped": "grouped conv"}
    (wide,) = selection.layers
    assert wide.macs == 144 * 16 * 16 * 9 and wide.in_positions == wide.out_positions == 144
    rules = SelectRules(exclude=("w*",), min_channels=1)
    reasons = {s.name: s.reason for s in select_convs(load(_stack()), rules).skipped}
    assert reasons["wide"] == "excluded" and "thin" not in reasons


def test_unknown_shapes_are_a_reason_until_the_input_shape_is_given():
    proto = conv_model(["N", 16, "H", "W"], 16, [3, 3], pads=[1] * 4)
    (skip,) = select_convs(load(proto)).skipped
    assert skip.reason == "unknown shapes (pass --input-shape)"
    layers = select_convs(load(proto), input_shapes={"x": (1, 16, 8, 8)}).layers
    assert layers and layers[0].in_shape == (1, 16, 8, 8)


def test_analyze_and_the_pass_pick_the_same_convs():
    """--analyze uses the pass's selection rule and defaults (min-channels included)."""
    model = load(_stack())
    analysis = rewriter.analyze(model)
    marked = {r.node: r.rank for r in analysis.rows if r.candidate}
    result = rewrite(load(_stack()), ["bottleneck"], guard=False)
    applied = {d.node: d.details["rank"] for d in result.report.passes[0].decisions if d.applied}
    assert marked == applied == {"wide": 8}
