"""The replacement head: a tree of 1x1 convs (with the ops between them) ending in global pooling.

Built from a matched `DenseHead`, evaluated in numpy on cached feature maps (to fit and to measure
it), and finally written into the graph. Keeping one description of the new head for all three
means the fitted numbers are the ones the emitted model computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir

from rewriter.graph import Namer, make_node, new_initializer, replace_value
from rewriter.head_match import PASS_THROUGH, DenseHead, DenseLayer, Elementwise


@dataclass
class ConvPlan:
    """One 1x1 conv of the new head: y = W x + b per position, then `post`, then children."""

    source: DenseLayer
    weight: np.ndarray  # [out, in] float64
    bias: np.ndarray  # [out]
    post: list[Elementwise] = field(default_factory=list)
    children: list[ConvPlan] = field(default_factory=list)

    def clone(self) -> ConvPlan:
        """A copy with its own arrays (graph objects shared, never deep-copied)."""
        return ConvPlan(self.source, self.weight.copy(), self.bias.copy(),
                        [clone_op(op) for op in self.post], [c.clone() for c in self.children])

    def walk(self) -> list[ConvPlan]:
        out = [self]
        for child in self.children:
            out.extend(child.walk())
        return out

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def n_params(self) -> int:
        return self.weight.size + self.bias.size + sum(e.n_params for e in self.post)


def clone_op(op: Elementwise) -> Elementwise:
    """The op with its own parameter arrays (so narrowing a copy leaves the match intact)."""
    return replace(op, params={k: v.copy() for k, v in op.params.items()})


def plan_leaves(roots: list[ConvPlan]) -> list[ConvPlan]:
    return [p for root in roots for p in root.walk() if p.is_leaf]


def first_layer_weight(head: DenseHead, weight: np.ndarray) -> np.ndarray:
    """A first-layer weight [D, flat] as [D, C, H, W] in NCHW order (Transpose folded in)."""
    d = weight.shape[0]
    h, w = head.spatial if head.spatial is not None else (1, 1)
    if head.permutation is None:
        return weight.reshape(d, head.channels, h, w)
    nchw = (head.channels, h, w)
    permuted = [nchw[axis - 1] for axis in head.permutation[1:]]
    inverse = np.argsort([axis - 1 for axis in head.permutation[1:]])
    return weight.reshape(d, *permuted).transpose(0, *(inverse + 1))


def collapse_spatial(head: DenseHead, weight: np.ndarray) -> np.ndarray:
    """V[d, c] = Σ_hw W[d, c, h, w]: the same pre-activation when features are spatially flat."""
    return first_layer_weight(head, weight).sum(axis=(2, 3))


def exact_plan(head: DenseHead) -> list[ConvPlan]:
    """Every layer as it is (a pooled or 1x1 map: the rewrite changes no number)."""
    if head.pooled:
        return [ConvPlan(root, root.weight, root.bias) for root in head.roots]

    def convert(layer: DenseLayer, first: bool) -> ConvPlan:
        weight = collapse_spatial(head, layer.weight) if first else layer.weight
        return ConvPlan(layer, weight, layer.bias, list(layer.post),
                        [convert(c, False) for c in layer.children])

    return [convert(root, True) for root in head.roots]


# ------------------------------------------------------------------------------ numpy forward


def apply_elementwise(op: Elementwise, x: np.ndarray) -> np.ndarray:
    """The op on [N, C, P] (channel axis 1), in float64."""
    a = op.attrs
    kind = op.op
    if kind in PASS_THROUGH:
        return x
    if kind == "Relu":
        return np.maximum(x, 0.0)
    if kind == "LeakyRelu":
        return np.where(x >= 0, x, a.get("alpha", 0.01) * x)
    if kind == "PRelu":
        return np.where(x >= 0, x, channel_param(op.params["slope"], x.shape[1], 3) * x)
    if kind == "Sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if kind == "Tanh":
        return np.tanh(x)
    if kind == "HardSigmoid":
        return np.clip(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0.0, 1.0)
    if kind == "HardSwish":
        return x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)
    if kind == "Elu":
        return np.where(x > 0, x, a.get("alpha", 1.0) * (np.exp(np.minimum(x, 0)) - 1.0))
    if kind == "Clip":
        low = op.params.get("min", np.array(a.get("min", -np.inf)))
        high = op.params.get("max", np.array(a.get("max", np.inf)))
        return np.clip(x, float(low), float(high))
    if kind == "BatchNormalization":
        p = op.params
        c = x.shape[1]
        scale = p["scale"] / np.sqrt(p["var"] + a.get("epsilon", 1e-5))
        return (x - channel_param(p["mean"], c, 3)) * channel_param(scale, c, 3) + channel_param(
            p["bias"], c, 3)
    raise ValueError(f"no numpy form for {kind}")


def channel_param(param: np.ndarray, channels: int, rank: int) -> np.ndarray:
    """A per-channel (or scalar) parameter shaped to broadcast over channel axis 1."""
    param = np.asarray(param)
    if param.size == 1:
        return param.reshape(())
    if param.size != channels:
        raise ValueError(f"parameter of {param.size} values for {channels} channels")
    return param.reshape((channels,) + (1,) * (rank - 2))


def forward(head: DenseHead, roots: list[ConvPlan], features: np.ndarray
            ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Pooled leaf inputs and leaf outputs, by id() of the leaf plan, for features [N,C,H,W]."""
    x = np.asarray(features, np.float64).reshape(len(features), features.shape[1], -1)
    for op in head.pre:
        x = apply_elementwise(op, x)
    pooled_in: dict[int, np.ndarray] = {}
    outputs: dict[int, np.ndarray] = {}

    def run(plan: ConvPlan, x: np.ndarray) -> None:
        if plan.is_leaf:
            pooled = x.mean(axis=2)  # GAP commutes with the last (linear) conv
            pooled_in[id(plan)] = pooled
            outputs[id(plan)] = pooled @ plan.weight.T + plan.bias
            return
        z = np.einsum("oc,ncp->nop", plan.weight, x, optimize=True) + plan.bias[:, None]
        for op in plan.post:
            z = apply_elementwise(op, z)
        for child in plan.children:
            run(child, z)

    for root in roots:
        run(root, x)
    return pooled_in, outputs


# ------------------------------------------------------------------------------ emission


def emit(graph: ir.Graph, head: DenseHead, roots: list[ConvPlan], namer: Namer) -> list[ir.Node]:
    """Insert the new head after the flatten and point every leaf's readers at it."""
    nodes: list[ir.Node] = []
    base = (head.flatten.name or "head").rstrip("/") + "/onexone_head"

    def add(op: str, inputs: list, attrs: dict | None = None) -> ir.Value:
        node = make_node(op, inputs, attrs, name=namer(f"{base}/{op}"), namer=namer)
        nodes.append(node)
        return node.outputs[0]

    def const(array: np.ndarray, dtype: np.dtype, role: str) -> ir.Value:
        return new_initializer(graph, namer(f"{base}/{role}"), np.asarray(array, dtype=dtype))

    x = head.features
    for op in head.pre:
        if op.op not in PASS_THROUGH:
            x = add(op.op, [x], _attrs(op.node))
    replacements: list[tuple[ir.Value, ir.Value]] = []

    def build(plan: ConvPlan, x: ir.Value) -> None:
        dtype = plan.source.dtype
        w = const(plan.weight[:, :, None, None], dtype, "weight")
        b = const(plan.bias, dtype, "bias")
        y = add("Conv", [x, w, b], {"kernel_shape": [1, 1], "strides": [1, 1],
                                    "pads": [0, 0, 0, 0], "dilations": [1, 1], "group": 1})
        for op in plan.post:
            y = _emit_elementwise(op, y, plan.weight.shape[0], add, const, dtype)
        if plan.is_leaf:
            pooled = add("GlobalAveragePool", [y])
            flat = add("Flatten", [pooled], {"axis": 1})
            replacements.append((plan.source.output, flat))
        for child in plan.children:
            build(child, y)

    for root in roots:
        build(root, x)
    graph.insert_after(head.flatten, nodes)
    for old, new in replacements:
        new.dtype = old.dtype
        replace_value(old, new)
    return nodes


def _attrs(node: ir.Node) -> dict:
    return {name: attr.value for name, attr in node.attributes.items()}


def _emit_elementwise(op: Elementwise, x: ir.Value, channels: int, add, const, dtype) -> ir.Value:
    if op.op in PASS_THROUGH:
        return x
    node = op.node
    if op.op == "PRelu":
        slope = channel_param(op.params["slope"], channels, 4)
        return add("PRelu", [x, const(slope, dtype, "slope")])
    if op.op == "BatchNormalization":
        p = op.params
        inputs = [x] + [const(p[k], dtype, f"bn_{k}") for k in ("scale", "bias", "mean", "var")]
        attrs = {k: v for k, v in _attrs(node).items() if k in ("epsilon", "momentum")}
        return add("BatchNormalization", inputs, attrs)
    if op.op == "Clip":
        inputs = [x] + [const(op.params[k], dtype, f"clip_{k}") if k in op.params else None
                        for k in ("min", "max")]
        while inputs[-1] is None:
            inputs.pop()
        return add("Clip", inputs, _attrs(node))
    return add(op.op, [x], _attrs(node))
