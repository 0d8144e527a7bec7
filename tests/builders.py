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


def channel_low_rank_kernel(rng: np.random.Generator, o: int, c: int, kernel: Sequence[int],
                            rank: int) -> np.ndarray:
    """A conv kernel of exactly `rank` along its input channels (rank-r bottlenecks are exact)."""
    k = int(np.prod(kernel))
    w = np.einsum("ork,rc->ock", rng.standard_normal((o, rank, k)), rng.standard_normal((rank, c)))
    return (0.1 * w).reshape(o, c, *kernel).astype(np.float32)


def spatial_low_rank_kernel(rng: np.random.Generator, o: int, c: int, kernel: Sequence[int],
                            rank: int) -> np.ndarray:
    """A 2-D kernel `[O, C, kh, kw]` of exactly `rank` as `[(c, i), (o, j)]` (a kx1 then 1xk
    pair of that rank is exact)."""
    kh, kw = kernel
    m = rng.standard_normal((c * kh, rank)) @ rng.standard_normal((rank, o * kw))
    return (0.1 * m).reshape(c, kh, o, kw).transpose(2, 0, 1, 3).astype(np.float32)


def with_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> onnx.ModelProto:
    """Replace the initializer `name` by `array` (in place; returns the model)."""
    for init in model.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(array, name))
    return model
