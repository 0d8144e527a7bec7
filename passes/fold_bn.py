"""`fold-bn`: Conv / ConvTranspose / Gemm followed by inference BatchNormalization -> one node.

Inference BN is a per-channel affine map `y = s * (x - mean) + beta` with
`s = scale / sqrt(var + eps)`, so it folds into the producer's weight (scaled per output
channel) and bias. Folding runs before factorizing passes so they see the weights the model
really applies. The math is done in float64 and written back in the weight's own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from passes import register
from passes.base import PassOptions, RewritePass
from rewriter.cost import node_cost
from rewriter.graph import (
    Namer,
    const_array,
    consumers,
    float_dtype_of,
    make_node,
    replace_value,
    set_constant_input,
    single_consumer,
    weight_is_private,
)

_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


@dataclass
class BatchNormAffine:
    """An inference BatchNormalization as `y = scale * x + shift` per channel (float64)."""

    scale: np.ndarray
    shift: np.ndarray


def batchnorm_affine(bn: ir.Node) -> BatchNormAffine | str:
    """The BN node as a per-channel affine map, or the reason it is not one we can fold."""
    training = bn.attributes.get_int("training_mode", 0)
    if training:
        return "BatchNormalization in training mode"
    if any(out.uses() or out.is_graph_output() for out in bn.outputs[1:]):
        return "BatchNormalization running-statistics outputs are used"
    params = [const_array(v) if v is not None else None for v in bn.inputs[1:5]]
    if len(params) < 4 or any(p is None for p in params):
        return "BatchNormalization parameters computed at run time"
    gamma, beta, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)
    eps = bn.attributes.get_float("epsilon", 1e-5)
    scale = gamma / np.sqrt(var + eps)
    return BatchNormAffine(scale, beta - mean * scale)


def _fold_into_weight(node: ir.Node, weight: np.ndarray, scale: np.ndarray) -> np.ndarray | str:
    """`weight` with output channels scaled by `scale`, in the layout of `node`'s op."""
    w = weight.astype(np.float64)
    if node.op_type == "Conv":
        if w.shape[0] != scale.size:
            return f"BatchNormalization has {scale.size} channels, conv {w.shape[0]}"
        return w * scale.reshape(-1, *([1] * (w.ndim - 1)))
    if node.op_type == "ConvTranspose":
        group = node.attributes.get_int("group", 1)
        per_group = w.shape[1]
        if per_group * group != scale.size:
            return f"BatchNormalization has {scale.size} channels, conv {per_group * group}"
        grouped = w.reshape(group, w.shape[0] // group, per_group, *w.shape[2:])
        factor = scale.reshape(group, 1, per_group, *([1] * (w.ndim - 2)))
        return (grouped * factor).reshape(w.shape)
    # Gemm: output column n of Y = A @ op(B) is column n of op(B).
    if w.ndim != 2:
        return "Gemm weight is not a matrix"
    trans_b = node.attributes.get_int("transB", 0)
    out_axis = 0 if trans_b else 1
    if w.shape[out_axis] != scale.size:
        return f"BatchNormalization has {scale.size} channels, Gemm {w.shape[out_axis]}"
    return w * (scale[:, None] if trans_b else scale[None, :])


def _bias(node: ir.Node, out_channels: int) -> np.ndarray | str:
    """The producer's current bias (zeros when absent) as float64, or why it cannot be read."""
    value = node.inputs[2] if len(node.inputs) > 2 else None
    if value is None:
        return np.zeros(out_channels)
    bias = const_array(value)
    if bias is None:
        return "bias computed at run time"
    bias = bias.astype(np.float64)
    if node.op_type == "Gemm":
        bias = bias * node.attributes.get_float("beta", 1.0)
    return bias


@register
class FoldBatchNorm(RewritePass):
    """Fold inference BatchNormalization into the Conv/ConvTranspose/Gemm that feeds it."""

    name = "fold-bn"
    summary = "fold inference BatchNormalization into the preceding Conv/ConvTranspose/Gemm"
    Options = PassOptions
    exact = True

    def apply(self, model: ir.Model) -> None:
        namer = Namer(model)
        for graph in model.graphs():
            for bn in list(graph):
                if bn.op_type == "BatchNormalization" and bn.domain in ("", "ai.onnx"):
                    self._fold(graph, bn, namer)

    def _fold(self, graph: ir.Graph, bn: ir.Node, namer: Namer) -> None:
        producer = bn.inputs[0].producer() if bn.inputs[0] is not None else None
        if producer is None or producer.op_type not in _PRODUCERS or producer.domain not in (
            "", "ai.onnx"
        ):
            op = producer.op_type if producer is not None else "graph input"
            self.report.skipped(
                bn.name, "BatchNormalization", f"fed by {op}, not Conv/ConvTranspose/Gemm"
            )
            return
        where = f"{producer.op_type} {producer.name}"
        reason = self._refusal(bn, producer)
        affine = batchnorm_affine(bn) if reason is None else reason
        if isinstance(affine, str):
            self.report.skipped(bn.name, "BatchNormalization", affine, details={"producer": where})
            return
        weight = const_array(producer.inputs[1])
        folded = _fold_into_weight(producer, weight, affine.scale)
        out_channels = affine.scale.size
        bias = _bias(producer, out_channels) if not isinstance(folded, str) else folded
        if isinstance(bias, str):
            self.report.skipped(bn.name, "BatchNormalization", bias, details={"producer": where})
            return
        before = [node_cost(producer), node_cost(bn)]
        new_bias = bias * affine.scale + affine.shift
        dtype = float_dtype_of(producer.inputs[1])
        base = producer.name or "folded"
        home = producer.graph or graph  # the producer may sit outside the BN's If/Loop body
        set_constant_input(home, producer, 1, folded.astype(dtype), namer, f"{base}_weight_bn")
        if len(producer.inputs) < 3:
            producer.resize_inputs(3)
        set_constant_input(home, producer, 2, new_bias.astype(dtype), namer, f"{base}_bias_bn")
        if producer.op_type == "Gemm":
            producer.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        folded_out = producer.outputs[0]
        if home is not graph:  # BN in a subgraph: an Identity there keeps the branch's output
            identity = make_node("Identity", [folded_out], None, name=namer(f"{bn.name}_folded"),
                                 namer=namer)
            graph.insert_before(bn, identity)
            folded_out = identity.outputs[0]
        replace_value(bn.outputs[0], folded_out)
        graph.remove(bn, safe=True)
        after = node_cost(producer)
        self.report.applied(
            bn.name,
            "BatchNormalization",
            f"folded into {where}",
            macs_before=_total(c.macs for c in before),
            macs_after=after.macs,
            params_before=sum(c.params for c in before),
            params_after=after.params,
            details={"producer": where, "channels": out_channels},
        )

    @staticmethod
    def _refusal(bn: ir.Node, producer: ir.Node) -> str | None:
        """Why `producer` may not absorb `bn`, or None when it may."""
        out = producer.outputs[0]
        if len(producer.outputs) != 1 or single_consumer(out) is not bn:
            others = [n.name for n in consumers(out) if n is not bn]
            users = ", ".join(others) if others else "a graph output"
            return f"{producer.op_type} output also read by {users}"
        if len(producer.inputs) < 2 or const_array(producer.inputs[1]) is None:
            return f"{producer.op_type} weight computed at run time"
        weight = producer.inputs[1]
        if not weight_is_private(weight, producer):
            others = [n.name for n in consumers(weight) if n is not producer]
            return f"weight shared with {', '.join(others) or 'a graph output'}"
        return None


def _total(values) -> int | None:
    values = list(values)
    return None if any(v is None for v in values) else int(sum(values))
