"""Graph helpers every pass shares, so no pass touches protobufs or re-implements edge bookkeeping.

onnx-ir is the single source of truth: values are SSA and know their producer and uses, so a
rewrite is "build nodes, insert them, replace the old value's uses, remove what went dead".
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

# ------------------------------------------------------------------------------ constants


def const_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The constant behind a value: an initializer or a `Constant` node output (PP-OCR style)."""
    if value is None:
        return None
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:
        return None


def const_array(value: ir.Value | None, dtype: np.dtype | type | None = None) -> np.ndarray | None:
    """The constant behind a value as numpy (optionally cast), or None when computed at run time.

    Graph inputs that double as initializers are not constant: a user may feed them.
    """
    if value is None or value.is_graph_input():
        return None
    tensor = const_tensor(value)
    if tensor is None:
        return None
    array = tensor.numpy()
    return array.astype(dtype) if dtype is not None else array


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register a new initializer in `graph` and return its value."""
    array = np.ascontiguousarray(array)
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def weight_is_private(value: ir.Value, node: ir.Node) -> bool:
    """True when `node` is the only user of `value` and it is not a graph output."""
    return not value.is_graph_output() and all(use.node is node for use in value.uses())


def float_dtype_of(value: ir.Value) -> np.dtype:
    """The numpy float dtype a rewritten weight must be written in (float16 models stay fp16)."""
    tensor = const_tensor(value)
    if tensor is not None:
        return tensor.dtype.numpy()
    if value.dtype is not None:
        return value.dtype.numpy()
    return np.dtype(np.float32)


# ------------------------------------------------------------------------------ naming


class Namer:
    """Deterministic unique names for new nodes and values (no counters shared across runs)."""

    def __init__(self, model_or_graph: ir.Model | ir.Graph) -> None:
        graphs = (
            list(model_or_graph.graphs())
            if isinstance(model_or_graph, ir.Model)
            else [model_or_graph, *(g for g in _subgraphs(model_or_graph))]
        )
        self._taken: set[str] = set()
        self._next: dict[str, int] = {}
        for graph in graphs:
            self._taken.update(v.name for v in graph.inputs if v.name)
            self._taken.update(graph.initializers)
            for node in graph:
                if node.name:
                    self._taken.add(node.name)
                self._taken.update(v.name for v in node.outputs if v.name)

    def __call__(self, base: str) -> str:
        """A name starting with `base` that no node or value of the model uses yet."""
        base = base or "onexone"
        name = base
        # Resume each base's suffix search where it stopped last time: linear overall, where
        # restarting at 1 made n names of one base cost n^2 lookups (20k nodes took minutes).
        start = self._next.get(base, 1)
        for i in itertools.count(start):
            if name not in self._taken:
                break
            name = f"{base}_{i}"
            self._next[base] = i + 1
        self._taken.add(name)
        return name


def _subgraphs(graph: ir.Graph) -> Iterable[ir.Graph]:
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield attr.value
            elif attr.type == ir.AttributeType.GRAPHS:
                yield from attr.value


# ------------------------------------------------------------------------------ editing


def make_node(
    op_type: str,
    inputs: Sequence[ir.Value | None],
    attributes: dict | None,
    *,
    name: str,
    namer: Namer,
    num_outputs: int = 1,
) -> ir.Node:
    """A node whose outputs get unique names derived from the node's name."""
    node = ir.node(op_type, inputs, _typed(attributes or {}), name=name, num_outputs=num_outputs)
    for i, out in enumerate(node.outputs):
        out.name = namer(f"{name}_out{i}" if num_outputs > 1 else f"{name}_out")
    return node


def _typed(attributes: dict) -> dict[str, ir.Attr]:
    """Attributes as typed `ir.Attr`s: onnx-ir's own type inference runs runtime Protocol
    checks per value (milliseconds each), which dominated passes adding thousands of nodes."""
    typed: dict[str, ir.Attr] = {}
    for key, value in attributes.items():
        if isinstance(value, ir.Attr):
            typed[key] = value
        elif isinstance(value, int):  # bool too
            typed[key] = ir.AttrInt64(key, int(value))
        elif isinstance(value, float):
            typed[key] = ir.AttrFloat32(key, value)
        elif isinstance(value, str):
            typed[key] = ir.AttrString(key, value)
        elif isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            typed[key] = ir.AttrInt64s(key, [int(v) for v in value])
        elif isinstance(value, (list, tuple)) and value and all(
            isinstance(v, float) for v in value
        ):
            typed[key] = ir.AttrFloat32s(key, [float(v) for v in value])
        else:
            typed[key] = ir.convenience.convert_attribute(key, value)
    return typed


def set_constant_input(
    graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, namer: Namer, base: str
) -> ir.Value:
    """Point input `index` of `node` at a new initializer holding `array`.

    The old constant is left alone: if another node shares it, that node keeps its weight; if
    not, dead-initializer removal drops it after the pass.
    """
    value = new_initializer(graph, namer(base), array)
    node.replace_input_with(index, value)
    return value


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Make every user of `old` read `new`; a graph output keeps its name (and so its interface)."""
    if old.is_graph_output():
        name = old.name
        old.name = None
        new.name = name
        if old.shape is not None and new.shape is None:
            new.shape = old.shape
        if old.type is not None and new.type is None:
            new.type = old.type
    old.replace_all_uses_with(new, replace_graph_outputs=True)


def remove_unused(model: ir.Model) -> None:
    """Drop nodes and initializers nothing reads (outer-scope uses in subgraphs count)."""
    RemoveUnusedNodesPass()(model)


def consumers(value: ir.Value) -> list[ir.Node]:
    """Distinct nodes reading `value`, in graph order of first use."""
    seen: dict[int, ir.Node] = {}
    for use in value.uses():
        seen.setdefault(id(use.node), use.node)
    return list(seen.values())


def single_consumer(value: ir.Value) -> ir.Node | None:
    """The only node reading `value`, or None (no use, several uses, or a graph output)."""
    users = consumers(value)
    if len(users) != 1 or value.is_graph_output():
        return None
    return users[0]


# ------------------------------------------------------------------------------ conv geometry


@dataclass(frozen=True)
class ConvGeometry:
    """A Conv node's attributes with ONNX defaults filled in (spatial rank from its weight)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    group: int
    auto_pad: str

    @property
    def is_pointwise(self) -> bool:
        return all(k == 1 for k in self.kernel)

    def attributes(self, *, keep_auto_pad: bool = True) -> dict:
        """Attributes for a Conv with this geometry (pads only when auto_pad is NOTSET)."""
        attrs: dict = {
            "kernel_shape": list(self.kernel),
            "strides": list(self.strides),
            "dilations": list(self.dilations),
            "group": self.group,
        }
        if keep_auto_pad and self.auto_pad not in ("", "NOTSET"):
            attrs["auto_pad"] = self.auto_pad
        else:
            attrs["pads"] = list(self.pads)
        return attrs


def conv_geometry(node: ir.Node, weight_shape: Sequence[int]) -> ConvGeometry:
    """Read Conv/ConvTranspose attributes with defaults; `weight_shape` gives the spatial rank."""
    spatial = len(weight_shape) - 2
    kernel = tuple(node.attributes.get_ints("kernel_shape", None) or weight_shape[2:])
    return ConvGeometry(
        kernel=tuple(int(k) for k in kernel),
        strides=tuple(node.attributes.get_ints("strides", None) or (1,) * spatial),
        pads=tuple(node.attributes.get_ints("pads", None) or (0,) * (2 * spatial)),
        dilations=tuple(node.attributes.get_ints("dilations", None) or (1,) * spatial),
        group=int(node.attributes.get_int("group", 1)),
        auto_pad=node.attributes.get_string("auto_pad", "NOTSET"),
    )


def pointwise_conv_attrs(spatial: int) -> dict:
    """Attributes of a plain 1x1 conv (stride 1, no padding) of the given spatial rank."""
    return {
        "kernel_shape": [1] * spatial,
        "strides": [1] * spatial,
        "pads": [0] * (2 * spatial),
        "dilations": [1] * spatial,
        "group": 1,
    }


def nodes_by_op(model: ir.Model, op_types: Iterable[str]) -> list[ir.Node]:
    """Every node (subgraphs included) whose op type is in `op_types`, in graph order."""
    wanted = set(op_types)
    return [
        node
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if node.domain in ("", "ai.onnx") and node.op_type in wanted
    ]


def descendants(model: ir.Model, index: int) -> set[int]:
    """Positions of the nodes downstream of the node at `index` (graph order is topological)."""
    nodes = list(model.graph)
    position = {id(n): i for i, n in enumerate(nodes)}
    seen: set[int] = set()
    stack = [nodes[index]]
    while stack:
        node = stack.pop()
        for out in node.outputs:
            for use in out.uses():
                i = position.get(id(use.node))
                if i is not None and i not in seen:
                    seen.add(i)
                    stack.append(use.node)
    return seen


#: Ops whose outputs are ordered by score: a position then holds a different detection as soon
#: as two scores swap, so comparing outputs position by position overstates any change.
REORDERING_OPS = ("TopK", "NonMaxSuppression")


def reordered_outputs(model: ir.Model) -> dict[str, str]:
    """Graph outputs computed through a `REORDERING_OPS` node: output name -> that op."""
    found: dict[str, str] = {}
    for output in model.graph.outputs:
        seen: set[int] = set()
        stack = [output.producer()]
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.domain in ("", "ai.onnx") and node.op_type in REORDERING_OPS:
                found[output.name] = node.op_type
                break
            stack.extend(v.producer() for v in node.inputs if v is not None)
    return found
