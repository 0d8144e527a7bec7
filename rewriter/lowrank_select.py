"""Which convs a low-rank pass may rewrite, each refusal with its reason.

One rule for `bottleneck`, `spatial-svd`, `--analyze` and `--dry-run`, so they cannot disagree:
a group-1 Conv of the main graph with constant float weights (and bias), a kernel larger than
1x1 (or, with `pointwise`, a 1x1 of at least `POINTWISE_MIN_SHARE` of the MACs), shapes known
on the fixed-shape analysis copy, selected by include/exclude globs and at least
`min_channels` input channels and `min_macs` of the model's MACs.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from rewriter.cost import model_cost
from rewriter.graph import ConvGeometry, const_array, conv_geometry, float_dtype_of
from rewriter.lowrank import Window
from rewriter.shapes import static_shape, with_input_shapes

#: Convs with fewer input channels gain little and fit badly.
DEFAULT_MIN_CHANNELS = 8
#: A 1x1 conv is factored only when it holds at least this share of the model's MACs: two
#: narrow 1x1 kernels in place of one pay only where the GEMM is large (not an SE block's FC).
POINTWISE_MIN_SHARE = 0.005


@dataclass(frozen=True)
class SelectRules:
    """The user's selection options (the same defaults everywhere)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_channels: int = DEFAULT_MIN_CHANNELS
    min_macs: float = 0.0
    pointwise: bool = False  # 1x1 convs too (factored C -> r -> O where that saves MACs)


@dataclass
class ConvLayer:
    """A conv a low-rank pass may rewrite, with everything read once from the graph."""

    index: int  # position in the main graph (the same in a clone of the model)
    node: ir.Node
    weight: np.ndarray  # float64 [O, C, *k]
    bias: np.ndarray | None
    geometry: ConvGeometry
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    macs: int
    dtype: np.dtype
    input_name: str
    output_name: str

    @property
    def name(self) -> str:
        return self.node.name or f"Conv#{self.index}"

    @property
    def channels(self) -> int:
        return self.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_positions(self) -> int:
        return math.prod(self.in_shape) // self.channels

    @property
    def out_positions(self) -> int:
        return math.prod(self.out_shape) // self.out_channels

    @property
    def params(self) -> int:
        return int(self.weight.size + (0 if self.bias is None else self.bias.size))

    @property
    def window(self) -> Window:
        g = self.geometry
        return Window(g.kernel, g.strides, g.dilations, g.pads, g.auto_pad)


@dataclass(frozen=True)
class Skip:
    """A conv left alone and why."""

    name: str
    reason: str
    index: int | None = None
    macs: int | None = None
    params: int | None = None
    details: dict = field(default_factory=dict)


@dataclass
class Selection:
    """The candidates, the refusals, and the model facts the selection read."""

    layers: list[ConvLayer]
    skipped: list[Skip]
    total_macs: int
    analysis: ir.Model  # the fixed-shape copy (shapes static where the inputs allow)


def select_convs(model: ir.Model, rules: SelectRules | None = None,
                 input_shapes: Mapping[str, Sequence[int]] | None = None,
                 analysis: ir.Model | None = None) -> Selection:
    """Candidates and skips in graph order; `analysis` (the fixed-shape copy) is built when not
    given. Candidate nodes are `model`'s own (so a pass can rewrite them)."""
    rules = rules or SelectRules()
    fixed = analysis if analysis is not None else with_input_shapes(model, input_shapes or {})
    total = model_cost(fixed).macs
    shaped = list(fixed.graph)
    positions = {id(n): i for i, n in enumerate(model.graph)}
    layers: list[ConvLayer] = []
    skipped: list[Skip] = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        index = positions.get(id(node))
        if index is None:
            skipped.append(Skip(node.name or "", "inside a subgraph"))
            continue
        found = check_conv(node, index, shaped[index], total, rules)
        if isinstance(found, str):
            skipped.append(Skip(node.name or f"Conv#{index}", found, index))
        else:
            layers.append(found)
    return Selection(layers, skipped, total, fixed)


def check_conv(node: ir.Node, index: int, shaped: ir.Node, total: int,
               rules: SelectRules) -> ConvLayer | str:
    """The conv as a candidate, or the reason it is not one (`shaped`: its fixed-shape twin)."""
    name = node.name or ""
    if rules.include and not any(fnmatch.fnmatchcase(name, p) for p in rules.include):
        return "not included"
    if any(fnmatch.fnmatchcase(name, p) for p in rules.exclude):
        return "excluded"
    w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        return "weight computed at run time"
    if not np.issubdtype(w.dtype, np.floating):
        return f"weight dtype {w.dtype} is not float"
    geometry = conv_geometry(node, w.shape)
    if geometry.group != 1:
        return "depthwise conv" if w.shape[1] == 1 else "grouped conv"
    if geometry.is_pointwise and not rules.pointwise:
        return "pointwise already"
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = const_array(node.inputs[2])
        if bias is None:
            return "bias computed at run time"
    in_shape = static_shape(shaped.inputs[0])
    out_shape = static_shape(shaped.outputs[0])
    if in_shape is None or out_shape is None:
        return "unknown shapes (pass --input-shape)"
    if w.shape[1] < rules.min_channels:
        return f"below min-channels ({w.shape[1]} < {rules.min_channels})"
    macs = math.prod(out_shape) * math.prod(w.shape[1:])
    if total and macs < rules.min_macs * total:
        return f"below min-macs ({macs / total:.2%} of the model)"
    if geometry.is_pointwise and total and macs < POINTWISE_MIN_SHARE * total:
        return (f"1x1 below {POINTWISE_MIN_SHARE:.1%} of the model's MACs (an extra kernel "
                "costs more than it saves)")
    return ConvLayer(
        index=index, node=node, weight=w.astype(np.float64),
        bias=None if bias is None else bias.astype(np.float64), geometry=geometry,
        in_shape=in_shape, out_shape=out_shape, macs=macs,
        dtype=float_dtype_of(node.inputs[1]), input_name=node.inputs[0].name,
        output_name=node.outputs[0].name,
    )
