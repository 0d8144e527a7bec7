"""1x1 (pointwise) convolutions as matrices: read them, compose two of them, find a linear
predecessor. Shared by `merge-1x1` and by `bottleneck`'s merge into a preceding 1x1 conv.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from rewriter.graph import const_array, conv_geometry, single_consumer


@dataclass(frozen=True)
class Pointwise:
    """A group-1, stride-1, unpadded 1x1 conv as y = W x + b (W: [O, C], b: [O])."""

    node: ir.Node
    weight: np.ndarray
    bias: np.ndarray


def as_pointwise(node: ir.Node | None) -> Pointwise | None:
    """The node as a pure 1x1 conv with constant weights, or None if it is anything else."""
    if node is None or node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        return None
    w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.ndim < 3:
        return None
    geo = conv_geometry(node, w.shape)
    if (
        not geo.is_pointwise
        or geo.group != 1
        or any(s != 1 for s in geo.strides)
        or any(p != 0 for p in geo.pads)
        or geo.auto_pad not in ("", "NOTSET", "VALID")
    ):
        return None
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = const_array(bias_value) if bias_value is not None else np.zeros(w.shape[0], w.dtype)
    if bias is None:
        return None
    return Pointwise(node, w.reshape(w.shape[0], w.shape[1]), bias)


def compose(first: Pointwise, second_weight: np.ndarray, second_bias: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """(W2, b2) after (W1, b1) as one affine map: W = W2 W1, b = W2 b1 + b2 (float64 math)."""
    w1 = first.weight.astype(np.float64)
    w2 = second_weight.astype(np.float64)
    b2 = np.zeros(w2.shape[0]) if second_bias is None else second_bias.astype(np.float64)
    return w2 @ w1, w2 @ first.bias.astype(np.float64) + b2


def linear_pointwise_producer(value: ir.Value) -> Pointwise | None:
    """The 1x1 conv producing `value` when nothing else reads its output (so it may change)."""
    node = value.producer()
    pw = as_pointwise(node)
    if pw is None or single_consumer(value) is None or len(node.outputs) != 1:
        return None
    return pw
