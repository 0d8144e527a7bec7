"""deepen: identity 1x1 conv + ReLU after conv ReLUs; outputs unchanged, options narrow it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.builders import make_model
from tests.passcheck import assert_same_outputs, random_feeds, run_pass


def net() -> onnx.ModelProto:
    """conv_a -> relu_a -> conv_b -> bn -> relu_b (graph output y), plus add -> relu_c."""
    rng = np.random.default_rng(0)

    def arr(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    inits = [numpy_helper.from_array(arr(6, 3, 3, 3), "wa"),
             numpy_helper.from_array(arr(5, 6, 3, 3), "wb"),
             numpy_helper.from_array(arr(5), "s"), numpy_helper.from_array(arr(5), "beta"),
             numpy_helper.from_array(arr(5), "m"),
             numpy_helper.from_array(np.abs(arr(5)) + 1, "v")]
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a", pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["ra", "wb"], ["cb"], name="conv_b", pads=[1] * 4),
        helper.make_node("BatchNormalization", ["cb", "s", "beta", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["y"], name="relu_b"),
        helper.make_node("Add", ["y", "y"], ["sum"], name="add"),
        helper.make_node("Relu", ["sum"], ["z"], name="relu_c"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z")]
    return make_model(nodes, [x], outs, inits)


def test_adds_identity_layers_after_conv_relus_exactly():
    proto = net()
    model, report = run_pass(proto, "deepen")
    applied = [d for d in report.decisions if d.applied]
    assert [d.node for d in applied] == ["relu_a", "relu_b"]  # relu_c follows an Add
    assert [d.details["channels"] for d in applied] == [6, 5]
    ops = [n.op_type for n in model.graph]
    assert ops.count("Conv") == 4 and ops.count("Relu") == 5
    assert [v.name for v in model.graph.outputs] == ["y", "z"]
    assert assert_same_outputs(proto, model, random_feeds(proto), 1e-6) <= 1e-6


def test_new_layer_sits_between_relu_and_its_readers():
    model, _ = run_pass(net(), "deepen", include=["relu_a"])
    conv_b = next(n for n in model.graph if n.name == "conv_b")
    new_relu = conv_b.inputs[0].producer()
    assert new_relu.op_type == "Relu" and new_relu.name.startswith("relu_a_deepen")
    new_conv = new_relu.inputs[0].producer()
    assert new_conv.inputs[0].producer().name == "relu_a"
    weight = new_conv.inputs[1].const_value.numpy()
    np.testing.assert_array_equal(weight[:, :, 0, 0], np.eye(6, dtype=np.float32))


@pytest.mark.parametrize(
    ("options", "expected"),
    [({"include": ["conv_b"]}, ["relu_b"]),
     ({"exclude": ["relu_a"]}, ["relu_b"]),
     ({"max_count": "1"}, ["relu_a"])],
)
def test_options_narrow_the_candidates(options, expected):
    proto = net()
    model, report = run_pass(proto, "deepen", **options)
    assert [d.node for d in report.decisions if d.applied] == expected
    skipped = [d for d in report.decisions if not d.applied]
    assert skipped and all(d.reason for d in skipped)
    assert_same_outputs(proto, model, random_feeds(proto), 1e-6)
