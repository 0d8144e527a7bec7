"""Small ONNX models built with onnx.helper for unit tests (no torch needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def make_model(
    nodes, inputs, outputs, initializers=(), opset: int = OPSET, **kw
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kw)
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)  # fills output shapes the checker requires


def conv_model(
    in_shape: Sequence[int | str],
    out_channels: int,
    kernel: Sequence[int],
    *,
    seed: int = 0,
    bias: bool = True,
    relu: bool = False,
    **attrs,
) -> onnx.ModelProto:
    """x -> Conv(W[, b]) [-> Relu] -> y with seeded random weights; attrs go on the Conv."""
    rng = np.random.default_rng(seed)
    c = int(in_shape[1])
    group = attrs.get("group", 1)
    w = rng.standard_normal((out_channels, c // group, *kernel)).astype(np.float32) * 0.1
    inits = [numpy_helper.from_array(w, "W")]
    conv_inputs = ["x", "W"]
    if bias:
        inits.append(
            numpy_helper.from_array(rng.standard_normal(out_channels).astype(np.float32), "B")
        )
        conv_inputs.append("B")
    nodes = [helper.make_node("Conv", conv_inputs, ["c" if relu else "y"], name="conv", **attrs)]
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["y"], name="relu"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make_model(nodes, [x], [y], inits)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path
