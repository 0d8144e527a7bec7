"""Cost model: MACs and parameters per node and per model.

A MAC is one multiply-add; bias additions are not MACs. Pooling counts one MAC per window element
and elementwise ops one per output element, so totals track what a CPU actually does while the
textbook conv figures stay exact. Costs need static shapes: analysis runs on a copy with inputs
fixed (`rewriter.shapes.with_input_shapes`); a node whose shapes are unknown gets `macs=None`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from rewriter.graph import const_tensor, conv_geometry
from rewriter.shapes import static_shape

_ELEMENTWISE = {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Relu",
    "LeakyRelu",
    "PRelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Clip",
    "Tanh",
    "Softmax",
    "BatchNormalization",
    "Pow",
    "Sqrt",
    "Exp",
    "Erf",
    "Gelu",
    "InstanceNormalization",
    "LayerNormalization",
    "Max",
    "Min",
}


@dataclass(frozen=True)
class NodeCost:
    """Cost of one node; `macs` is None when its shapes are not static."""

    name: str
    op_type: str
    macs: int | None
    params: int
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    kernel: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ModelCost:
    """Per-node costs and totals (parameters counted once even when a weight is shared)."""

    nodes: list[NodeCost]
    macs: int
    params: int
    unknown: list[str]  # nodes whose MACs could not be computed


def _prod(dims: Sequence[int]) -> int:
    return int(math.prod(int(d) for d in dims))


def _const_elements(node: ir.Node) -> dict[str, int]:
    """Float constant inputs (weights, biases, BN statistics) by value name -> element count."""
    out = {}
    for value in node.inputs:
        tensor = const_tensor(value) if value is not None else None
        if tensor is None or not tensor.dtype.is_floating_point():
            continue
        out[value.name or f"{node.name}:{id(value)}"] = _prod(tensor.shape)
    return out


def _weight_shape(node: ir.Node) -> tuple[int, ...] | None:
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    tensor = const_tensor(node.inputs[1])
    if tensor is not None:
        return tuple(int(d) for d in tensor.shape)
    return static_shape(node.inputs[1])


def _conv_macs(node: ir.Node, x: tuple | None, y: tuple | None) -> int | None:
    w = _weight_shape(node)
    if w is None or y is None:
        return None
    # Conv: every output element is a dot product over (C/group) * prod(kernel) inputs.
    return _prod(y) * _prod(w[1:])


def _conv_transpose_macs(node: ir.Node, x: tuple | None, y: tuple | None) -> int | None:
    w = _weight_shape(node)  # [C, O/group, k...]
    if w is None or x is None:
        return None
    # ConvTranspose scatters every input element into (O/group) * prod(kernel) outputs.
    return _prod(x) * _prod(w[1:])


def _gemm_macs(node: ir.Node, x: tuple | None, y: tuple | None) -> int | None:
    a = static_shape(node.inputs[0])
    if a is None or y is None or len(a) != 2:
        return None
    k = a[0] if node.attributes.get_int("transA", 0) else a[1]
    return _prod(y) * k


def _matmul_macs(node: ir.Node, x: tuple | None, y: tuple | None) -> int | None:
    a = static_shape(node.inputs[0])
    if a is None or y is None or not a:
        return None
    return _prod(y) * a[-1]


def _pool_macs(node: ir.Node, x: tuple | None, y: tuple | None) -> int | None:
    if y is None:
        return None
    return _prod(y) * _prod(node.attributes.get_ints("kernel_shape", [1]))


def _global_pool_macs(node: ir.Node, x: tuple | None, y: tuple | None) -> int | None:
    return _prod(x) if x is not None else None


def _elementwise_macs(node: ir.Node, x: tuple | None, y: tuple | None) -> int | None:
    return _prod(y) if y is not None else None


_MAC_RULES: dict[str, Callable[[ir.Node, tuple | None, tuple | None], int | None]] = {
    "Conv": _conv_macs,
    "ConvTranspose": _conv_transpose_macs,
    "Gemm": _gemm_macs,
    "MatMul": _matmul_macs,
    "MaxPool": _pool_macs,
    "AveragePool": _pool_macs,
    "LpPool": _pool_macs,
    "GlobalAveragePool": _global_pool_macs,
    "GlobalMaxPool": _global_pool_macs,
    **{op: _elementwise_macs for op in _ELEMENTWISE},
}


def node_cost(node: ir.Node) -> NodeCost:
    """MACs and parameters of one node (zero MACs for data movement such as Reshape)."""
    x = static_shape(node.inputs[0]) if node.inputs and node.inputs[0] is not None else None
    y = static_shape(node.outputs[0]) if node.outputs else None
    rule = _MAC_RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    macs = rule(node, x, y) if rule else 0
    kernel = None
    if node.op_type in ("Conv", "ConvTranspose"):
        w = _weight_shape(node)
        if w is not None:
            kernel = conv_geometry(node, w).kernel
    return NodeCost(
        name=node.name or "",
        op_type=node.op_type,
        macs=macs,
        params=sum(_const_elements(node).values()),
        input_shape=x,
        output_shape=y,
        kernel=kernel,
    )


def model_cost(model: ir.Model) -> ModelCost:
    """Costs of every node of the main graph and subgraphs; shared weights counted once."""
    nodes: list[NodeCost] = []
    weights: dict[str, int] = {}
    unknown: list[str] = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant":
            continue
        cost = node_cost(node)
        nodes.append(cost)
        weights.update(_const_elements(node))
        if cost.macs is None:
            unknown.append(cost.name)
    return ModelCost(
        nodes=nodes,
        macs=sum(c.macs or 0 for c in nodes),
        params=sum(weights.values()),
        unknown=unknown,
    )


def conv_macs(
    out_positions: int, out_channels: int, in_channels: int, kernel: Sequence[int]
) -> int:
    """MACs of a group-1 conv producing `out_positions` x `out_channels` outputs."""
    return out_positions * out_channels * in_channels * _prod(kernel)


def bottleneck_macs(
    in_positions: int,
    out_positions: int,
    in_channels: int,
    out_channels: int,
    rank: int,
    kernel: Sequence[int],
    *,
    restore: bool = False,
) -> int:
    """MACs after a 1x1 reduce to `rank` channels (and, with `restore`, a 1x1 restore).

    `mode=in`: H*W*r*C + H'W'*O*r*k^2. `mode=in-out` (Tucker-2): the kxk core maps r -> r and a
    1x1 restores r -> O: H*W*r*C + H'W'*r*r*k^2 + H'W'*O*r.
    """
    reduce = conv_macs(in_positions, rank, in_channels, [1])
    if not restore:
        return reduce + conv_macs(out_positions, out_channels, rank, kernel)
    return (
        reduce
        + conv_macs(out_positions, rank, rank, kernel)
        + conv_macs(out_positions, out_channels, rank, [1])
    )


def count_params(arrays: Sequence[np.ndarray]) -> int:
    """Total elements of the given weight arrays."""
    return int(sum(a.size for a in arrays))


def round_rank(rank: float, multiple: int, limit: int) -> int:
    """Round a rank to the nearest multiple of `multiple` (at least one multiple, at most
    `limit`); runtimes' kernels run faster on such widths."""
    if multiple <= 1:
        return int(min(max(1, round(rank)), limit))
    rounded = int(round(rank / multiple)) * multiple
    return int(min(max(multiple, rounded), limit))
