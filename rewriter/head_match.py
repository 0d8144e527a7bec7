"""Find dense classifier heads on a conv feature map, as data the `dense-head` pass can rewrite.

A head is `features [N,C,H,W] (→ Transpose) → Flatten/Reshape → dense layer (→ act → dense)…`,
where a dense layer is a Gemm or MatMul(+Add) with constant weights. Layers form a tree: a shared
trunk layer may feed several sibling layers (class scores, box regression, …). Matching only
reads the graph; every failure returns a reason so the pass can report it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from rewriter.graph import const_array, consumers

#: Ops a conv feature map may pass through (layout stays NCHW) before it is flattened.
_LAYOUT_KEEPING = {
    "Relu", "PRelu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
    "BatchNormalization", "Dropout", "Identity", "Add", "Mul", "Div", "Sub", "Concat",
}
#: Per-channel ops allowed between dense layers; they move unchanged to the NCHW layout.
ELEMENTWISE = {
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Clip",
    "BatchNormalization", "Dropout", "Identity",
}
#: Ops without parameters (they commute with Flatten, so may sit between Flatten and the head).
PARAMETER_FREE = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu"}
#: Inference no-ops, dropped by the rewrite.
PASS_THROUGH = {"Dropout", "Identity"}
_MAX_WALK = 200


class NoMatch(Exception):
    """A candidate is not a head this pass can rewrite; the message is the reported reason."""


@dataclass
class Elementwise:
    """A per-channel op of the head: op type, attributes and constant parameters by role."""

    node: ir.Node
    op: str
    attrs: dict[str, float]
    params: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return int(sum(p.size for p in self.params.values()))


@dataclass
class DenseLayer:
    """One Gemm or MatMul(+Add) as y = x Wᵀ + b, with what follows it in the head."""

    nodes: list[ir.Node]
    weight: np.ndarray  # [out, in], float64
    bias: np.ndarray  # [out], float64
    output: ir.Value  # pre-activation output (what a leaf's rewrite replaces)
    dtype: np.dtype
    post: list[Elementwise] = field(default_factory=list)
    children: list[DenseLayer] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.nodes[0].name or self.output.name or "dense"

    @property
    def op(self) -> str:
        return "+".join(n.op_type for n in self.nodes)

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def walk(self) -> list[DenseLayer]:
        """This layer and all below it, parents first."""
        out = [self]
        for child in self.children:
            out.extend(child.walk())
        return out

    def leaves(self) -> list[DenseLayer]:
        return [layer for layer in self.walk() if layer.is_leaf]


@dataclass
class DenseHead:
    """A matched head: the NCHW map it reads, how it was flattened, and its layer tree."""

    flatten: ir.Node
    features: ir.Value  # NCHW map the rewritten head reads
    channels: int
    spatial: tuple[int, int] | None  # (H, W) when static
    pooled: bool  # the map is global-average-pooled before the flatten (exact case)
    permutation: tuple[int, ...] | None  # Transpose perm folded into the first layer's weight
    pre: list[Elementwise]  # parameter-free ops between the flatten and the first layers
    roots: list[DenseLayer]

    @property
    def layers(self) -> list[DenseLayer]:
        return [layer for root in self.roots for layer in root.walk()]

    @property
    def leaves(self) -> list[DenseLayer]:
        return [leaf for root in self.roots for leaf in root.leaves()]

    @property
    def positions(self) -> int:
        """H*W of the map the first layers read (1 after global pooling)."""
        if self.pooled or self.spatial is None:
            return 1
        return self.spatial[0] * self.spatial[1]

    @property
    def depth(self) -> int:
        def depth(layer: DenseLayer) -> int:
            return 1 + max((depth(c) for c in layer.children), default=0)

        return max(depth(r) for r in self.roots)

    def n_params(self) -> int:
        """Parameters of the dense layers and the ops between them."""
        return sum(
            layer.weight.size + layer.bias.size + sum(e.n_params for e in layer.post)
            for layer in self.layers
        )


# ------------------------------------------------------------------------------ flatten


def flatten_candidates(graph: ir.Graph) -> list[ir.Node]:
    """Flatten nodes and Reshapes to rank 2 (the possible starts of a head), in graph order."""
    out = []
    for node in graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Flatten" or (node.op_type == "Reshape" and _reshape_rank(node) == 2):
            out.append(node)
    return out


def match_head(flatten: ir.Node) -> DenseHead:
    """The head starting at `flatten`, or NoMatch with the reason it cannot be rewritten."""
    source = flatten.inputs[0]
    in_shape = source.shape
    if in_shape is None or len(in_shape) != 4:
        raise NoMatch("flattened value is not a 4-D feature map")
    _check_flattens_to_batch(flatten)

    permutation = None
    features = source
    producer = source.producer()
    if producer is not None and producer.op_type == "Transpose":
        perm = tuple(producer.attributes.get_ints("perm", None) or (3, 2, 1, 0))
        if perm[0] != 0:
            raise NoMatch(f"Transpose '{producer.name}' moves the batch axis (perm={list(perm)})")
        permutation = perm
        features = producer.inputs[0]
    _check_nchw(features)

    channel_dim = features.shape[1] if features.shape is not None else None
    if not isinstance(channel_dim, int) or channel_dim <= 0:
        raise NoMatch("channel count of the feature map is unknown")
    channels = int(channel_dim)
    gap = features.producer()
    pooled = permutation is None and gap is not None and gap.op_type == "GlobalAveragePool"
    if pooled:
        # Read the map before pooling: the rewrite puts the 1x1 convs in front of the pool.
        features = gap.inputs[0]
    spatial = _spatial(features)
    if spatial is None and not pooled:
        raise NoMatch("feature map size is not static (the dense weight needs it)")

    flat_in = channels if pooled else channels * spatial[0] * spatial[1]
    pre, value = _follow_elementwise(flatten.outputs[0], PARAMETER_FREE | PASS_THROUGH)
    if pooled and any(e.op not in PASS_THROUGH for e in pre):
        bad = next(e for e in pre if e.op not in PASS_THROUGH)
        raise NoMatch(f"{bad.op} '{bad.node.name}' sits between global pooling and the dense "
                      "layer (it does not commute with pooling)")
    roots = [_match_layer(node, value, flat_in) for node in _dense_consumers(value)]
    if not roots:
        users = ", ".join(f"{n.op_type} '{n.name}'" for n in consumers(value)) or "nothing"
        raise NoMatch(f"flattened features feed no dense layer with constant weights ({users})")
    head = DenseHead(flatten, features, channels, spatial, pooled, permutation, pre, roots)
    return head


def _check_flattens_to_batch(flatten: ir.Node) -> None:
    """Flatten must keep the batch axis alone. A rank-2 Reshape needs no check here: the dense
    layer's input width is checked to equal C*H*W, which forces [N, C*H*W] (PP-OCR computes its
    Reshape target at run time, so it cannot be read)."""
    if flatten.op_type == "Flatten":
        axis = flatten.attributes.get_int("axis", 1)
        if axis not in (1, -3):
            raise NoMatch(f"Flatten axis={axis} does not keep the batch axis alone")


def _check_nchw(value: ir.Value) -> None:
    """Walk back to a conv (or a graph input) through layout-keeping ops; else layout unknown."""
    for _ in range(_MAX_WALK):
        node = value.producer()
        if node is None:
            return  # a 4-D graph input: ONNX image inputs are NCHW
        if node.op_type in ("Conv", "ConvTranspose", "QLinearConv"):
            return
        if node.op_type == "Concat" and node.attributes.get_int("axis", 0) not in (1, -3):
            raise NoMatch(f"Concat '{node.name}' joins along axis != 1: feature layout unknown")
        if node.op_type not in _LAYOUT_KEEPING:
            raise NoMatch(
                f"cannot tell the feature map layout: it comes from {node.op_type} '{node.name}'"
            )
        runtime = [v for v in node.inputs if v is not None and const_array(v) is None]
        if not runtime:
            return
        value = runtime[0]
    raise NoMatch("feature map source not found")


# ------------------------------------------------------------------------------ dense layers


def _dense_consumers(value: ir.Value) -> list[ir.Node]:
    return [n for n in consumers(value) if n.op_type in ("Gemm", "MatMul") and n.inputs[0] is value]


def read_dense(
    node: ir.Node, expected_in: int
) -> tuple[list[ir.Node], np.ndarray, np.ndarray, ir.Value]:
    """(nodes, W [out,in], b [out], output) of a Gemm or MatMul(+Add) reading the features."""
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            raise NoMatch(f"Gemm '{node.name}' has transA=1 (reads the features transposed)")
        b_value = node.inputs[1]
        w = const_array(b_value)
        if w is None:
            raise NoMatch(f"Gemm '{node.name}' weight is computed at run time")
        w = w.astype(np.float64)
        w = w if node.attributes.get_int("transB", 0) else w.T
        w = w * node.attributes.get_float("alpha", 1.0)
        bias = np.zeros(w.shape[0])
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = const_array(node.inputs[2])
            if c is None:
                raise NoMatch(f"Gemm '{node.name}' bias is computed at run time")
            bias = _bias_vector(c, w.shape[0], node) * node.attributes.get_float("beta", 1.0)
        nodes, output = [node], node.outputs[0]
    else:
        w = const_array(node.inputs[1])
        if w is None or w.ndim != 2:
            raise NoMatch(f"MatMul '{node.name}' weight is not a constant matrix")
        w = w.astype(np.float64).T
        nodes, output = [node], node.outputs[0]
        bias = np.zeros(w.shape[0])
        add = _single_user(output)
        if add is not None and add.op_type == "Add":
            other = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
            c = const_array(other)
            if c is not None:
                bias = _bias_vector(c, w.shape[0], add)
                nodes, output = [node, add], add.outputs[0]
    if w.shape[1] != expected_in:
        raise NoMatch(f"{node.op_type} '{node.name}' expects {w.shape[1]} inputs, "
                      f"the features have {expected_in}")
    return nodes, w, bias.astype(np.float64), output


def _bias_vector(c: np.ndarray, out: int, node: ir.Node) -> np.ndarray:
    c = np.asarray(c, dtype=np.float64)
    if c.size == 1:
        return np.full(out, float(c.ravel()[0]))
    if c.ndim <= 2 and c.shape[-1] == out and c.size == out:
        return c.reshape(out)
    raise NoMatch(f"{node.op_type} '{node.name}' bias of shape {list(c.shape)} varies per sample")


def _match_layer(node: ir.Node, value: ir.Value, expected_in: int) -> DenseLayer:
    nodes, w, b, output = read_dense(node, expected_in)
    dtype = _dtype(node.inputs[1])
    layer = DenseLayer(nodes, w, b, output, dtype)
    post, end = _follow_elementwise(output, ELEMENTWISE)
    dense = _dense_consumers(end)
    # Interior only when the chain ends in dense layers and nothing else reads it: the rewrite
    # moves these ops to the NCHW map, so any other reader would lose its 2-D value.
    if dense and len(dense) == len(consumers(end)) and not end.is_graph_output():
        try:
            children = [_match_layer(n, end, w.shape[0]) for n in dense]
            layer.post = [_with_params(e) for e in post]
            layer.children = children
        except NoMatch:
            layer.post, layer.children = [], []
    return layer


def _follow_elementwise(value: ir.Value, allowed: set[str]) -> tuple[list[Elementwise], ir.Value]:
    """The chain of single-reader `allowed` ops after `value`, and the value at its end."""
    chain: list[Elementwise] = []
    while True:
        user = _single_user(value)
        if user is None or user.op_type not in allowed or value.is_graph_output():
            return chain, value
        if user.op_type == "Dropout" and (len(user.outputs) > 1 and user.outputs[1].uses()):
            return chain, value
        if user.op_type == "BatchNormalization" and user.attributes.get_int("training_mode", 0):
            return chain, value
        chain.append(Elementwise(user, user.op_type, _float_attrs(user)))
        value = user.outputs[0]


def _with_params(op: Elementwise) -> Elementwise:
    """Read the op's constant inputs (PRelu slope, Clip bounds, BN statistics)."""
    node = op.node
    roles = {
        "PRelu": ["x", "slope"],
        "Clip": ["x", "min", "max"],
        "BatchNormalization": ["x", "scale", "bias", "mean", "var"],
    }.get(op.op, ["x"])
    for role, value in zip(roles[1:], list(node.inputs)[1:], strict=False):
        if value is None:
            continue
        array = const_array(value)
        if array is None:
            raise NoMatch(f"{op.op} '{node.name}' {role} is computed at run time")
        op.params[role] = array.astype(np.float64)
    return op


def _float_attrs(node: ir.Node) -> dict[str, float]:
    out = {}
    for name, attr in node.attributes.items():
        if attr.type == ir.AttributeType.FLOAT:
            out[name] = float(attr.value)
        elif attr.type == ir.AttributeType.INT:
            out[name] = int(attr.value)
    return out


def _single_user(value: ir.Value) -> ir.Node | None:
    users = consumers(value)
    return users[0] if len(users) == 1 else None


def _spatial(value: ir.Value) -> tuple[int, int] | None:
    """(H, W) of an NCHW value when both are known (the batch may be symbolic)."""
    shape = value.shape
    if shape is None or len(shape) != 4:
        return None
    h, w = shape[2], shape[3]
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
        return h, w
    return None


def _reshape_rank(node: ir.Node) -> int | None:
    """Rank of a Reshape's result: from its inferred shape, else from its target's length."""
    if node.outputs[0].shape is not None:
        return len(node.outputs[0].shape)
    target = node.inputs[1].shape if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if target is not None and len(target) == 1 and isinstance(target[0], int):
        return int(target[0])
    return None


def _dtype(value: ir.Value) -> np.dtype:
    array = const_array(value)
    return np.dtype(np.float32) if array is None else array.dtype
