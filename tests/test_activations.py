"""Detecting the activation a conv feeds (the target of a post-activation refit)."""

from __future__ import annotations

import onnx_ir as ir
from onnx import TensorProto, helper

from rewriter.activations import following_activation
from tests.builders import conv_model


def _graph(extra_nodes, outputs=("out",)):
    base = conv_model(["N", 3, 8, 8], 4, [3, 3], pads=[1, 1, 1, 1])
    base.graph.node.extend(extra_nodes)
    del base.graph.output[:]
    for name in outputs:
        base.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    model = ir.from_proto(base)
    conv = next(n for n in model.graph if n.op_type == "Conv")
    outs = {id(v) for v in model.graph.outputs}
    return conv.outputs[0], outs


def test_silu_relu_and_anything_else():
    silu = [helper.make_node("Sigmoid", ["y"], ["s"]), helper.make_node("Mul", ["y", "s"], ["out"])]
    assert following_activation(*_graph(silu)) == "Silu"
    assert following_activation(*_graph([helper.make_node("Relu", ["y"], ["out"])])) == "Relu"
    # the conv output also read elsewhere, or exposed: the pre-activation must match
    branch = [*silu, helper.make_node("Add", ["y", "y"], ["other"])]
    assert following_activation(*_graph(branch, ("out", "other"))) is None
    assert following_activation(*_graph(silu, ("out", "y"))) is None
    tanh = [helper.make_node("Tanh", ["y"], ["out"])]
    assert following_activation(*_graph(tanh)) is None
    wrong_mul = [helper.make_node("Sigmoid", ["y"], ["s"]),
                 helper.make_node("Mul", ["s", "s"], ["m"]),
                 helper.make_node("Add", ["m", "y"], ["out"])]
    assert following_activation(*_graph(wrong_mul)) is None
