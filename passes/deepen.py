"""`deepen`: add an identity-initialised 1x1 conv + ReLU after a conv's ReLU (Net2DeeperNet).

The ReLU's output is >= 0, so `Relu(I * y + 0) == y` exactly: outputs do not change, but the
new 1x1 layer (Network in Network's extra non-linearity) is capacity that fine-tuning (`--distill`)
can use. Candidates are Relu nodes fed by a Conv, directly or through BatchNormalization.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from rewriter.passes import option, register
from rewriter.passes.base import PassOptions, RewritePass

from rewriter.cost import node_cost
from rewriter.graph import (
    Namer,
    const_tensor,
    float_dtype_of,
    make_node,
    new_initializer,
    pointwise_conv_attrs,
    replace_value,
)
from rewriter.shapes import static_shape


@dataclass
class DeepenOptions(PassOptions):
    include: list[str] = option(
        [], "only Relu or Conv node names matching these globs ('|'-separated)"
    )
    exclude: list[str] = option([], "skip Relu or Conv node names matching these globs")
    max_count: int | None = option(None, "add at most this many layers (first in graph order)")

    def validate(self) -> None:
        if self.max_count is not None and self.max_count < 0:
            raise ValueError("max-count must be >= 0")


@register
class Deepen(RewritePass):
    """Insert identity 1x1 conv + ReLU after each Relu fed by a Conv (optionally through BN)."""

    name = "deepen"
    summary = "add identity-initialised 1x1 conv + ReLU after conv ReLUs (capacity to fine-tune)"
    Options = DeepenOptions
    exact = True

    def apply(self, model: ir.Model) -> None:
        opts: DeepenOptions = self.options  # type: ignore[assignment]
        namer = Namer(model)
        for graph in model.graphs():
            for relu in list(graph):
                if relu.op_type != "Relu" or relu.domain not in ("", "ai.onnx"):
                    continue
                conv = _feeding_conv(relu)
                if conv is None:
                    continue  # not a candidate: ReLU not fed by a conv
                reason = self._refusal(relu, conv, opts)
                if reason is not None:
                    self.report.skipped(relu.name, "Relu", reason, details={"conv": conv.name})
                    continue
                self._insert_after(graph, relu, conv, namer)

    def _refusal(self, relu: ir.Node, conv: ir.Node, opts: DeepenOptions) -> str | None:
        names = [relu.name or "", conv.name or ""]
        if opts.include and not any(_matches(n, opts.include) for n in names):
            return "not matched by include"
        if any(_matches(n, opts.exclude) for n in names):
            return "matched by exclude"
        if opts.max_count is not None and self.report.n_applied >= opts.max_count:
            return f"max-count={opts.max_count} reached"
        if _channels(relu, conv) is None:
            return "channel count unknown"
        return None

    def _insert_after(self, graph: ir.Graph, relu: ir.Node, conv: ir.Node, namer: Namer) -> None:
        channels = _channels(relu, conv)
        spatial = _spatial_rank(relu, conv)
        dtype = float_dtype_of(conv.inputs[1])
        base = namer(f"{relu.name or 'relu'}_deepen")
        eye = np.eye(channels, dtype=dtype).reshape(channels, channels, *([1] * spatial))
        weight = new_initializer(graph, namer(f"{base}_weight"), eye)
        bias = new_initializer(graph, namer(f"{base}_bias"), np.zeros(channels, dtype))
        y = relu.outputs[0]
        new_conv = make_node("Conv", [y, weight, bias], pointwise_conv_attrs(spatial),
                             name=f"{base}_conv", namer=namer)
        new_relu = make_node("Relu", [new_conv.outputs[0]], None, name=f"{base}_relu", namer=namer)
        new_relu.outputs[0].shape = y.shape
        new_relu.outputs[0].type = y.type
        graph.insert_after(relu, [new_conv, new_relu])
        replace_value(y, new_relu.outputs[0])
        new_conv.replace_input_with(0, y)  # replace_value redirected it too
        if y.name is None:  # y was a graph output: the new ReLU took over its name
            y.name = namer(f"{base}_in")
        cost = node_cost(new_conv)
        self.report.applied(
            relu.name, "Relu", f"added {channels}-channel 1x1 conv + ReLU",
            macs_before=0, macs_after=cost.macs, params_before=0,
            params_after=channels * channels + channels,
            details={"conv": conv.name, "new_conv": new_conv.name, "channels": channels},
        )


def _feeding_conv(relu: ir.Node) -> ir.Node | None:
    """The Conv feeding `relu`, directly or through one BatchNormalization, else None."""
    producer = relu.inputs[0].producer() if relu.inputs and relu.inputs[0] is not None else None
    if producer is not None and producer.op_type == "BatchNormalization":
        producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
    if producer is None or producer.op_type != "Conv" or producer.domain not in ("", "ai.onnx"):
        return None
    return producer


def _channels(relu: ir.Node, conv: ir.Node) -> int | None:
    weight = const_tensor(conv.inputs[1]) if len(conv.inputs) > 1 else None
    if weight is not None:
        return int(weight.shape[0])
    shape = static_shape(relu.outputs[0])
    return shape[1] if shape is not None and len(shape) >= 2 else None


def _spatial_rank(relu: ir.Node, conv: ir.Node) -> int:
    weight = const_tensor(conv.inputs[1])
    if weight is not None:
        return len(weight.shape) - 2
    return len(relu.outputs[0].shape) - 2


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
