"""`merge-1x1`: two 1x1 convs with nothing non-linear between are one affine map.

`W2 (W1 x + b1) + b2 = (W2 W1) x + (W2 b1 + b2)`. Merging C -> M -> O into C -> O costs
`O*C` MACs per position instead of `M*C + O*M`: cheaper unless M is wide compared with C and O
(a bottleneck pair that already saves MACs is left alone). Chains merge step by step: the second
conv is rewritten in place, so the next 1x1 downstream sees the merged one as its producer.
"""

from __future__ import annotations

import onnx_ir as ir
from rewriter.passes import register
from rewriter.passes.base import PassOptions, RewritePass

from rewriter.cost import node_cost
from rewriter.graph import Namer, const_tensor, float_dtype_of, set_constant_input
from rewriter.pointwise import as_pointwise, compose, linear_pointwise_producer


@register
class Merge1x1(RewritePass):
    """Merge a 1x1 conv into the 1x1 conv that feeds it when that saves MACs."""

    name = "merge-1x1"
    summary = "merge two consecutive 1x1 convs (no nonlinearity between) when cheaper"
    Options = PassOptions
    exact = True

    def apply(self, model: ir.Model) -> None:
        namer = Namer(model)
        for graph in model.graphs():
            for node in list(graph):
                second = as_pointwise(node)
                if second is None or node.inputs[0] is None:
                    continue
                producer = node.inputs[0].producer()
                if producer is None or producer.op_type != "Conv":
                    continue  # only 1x1 -> 1x1 pairs are candidates
                first = linear_pointwise_producer(node.inputs[0])
                if first is None:
                    reason = (
                        "first conv output has other readers"
                        if as_pointwise(producer) is not None
                        else "producer is not a plain 1x1 conv (kernel, stride, pads or group)"
                    )
                    self.report.skipped(node.name, "Conv", reason, details={"first": producer.name})
                    continue
                self._merge(graph, first, second, namer)

    def _merge(self, graph: ir.Graph, first, second, namer: Namer) -> None:
        c, m, o = first.weight.shape[1], first.weight.shape[0], second.weight.shape[0]
        per_position_before, per_position_after = m * c + o * m, o * c
        node = second.node
        if per_position_after >= per_position_before:
            self.report.skipped(
                node.name, "Conv",
                f"merged conv would not save MACs ({c}->{m}->{o}: {per_position_after} vs "
                f"{per_position_before} per position)",
                details={"first": first.node.name},
            )
            return
        before = [node_cost(first.node), node_cost(node)]
        weight, bias = compose(first, second.weight, second.bias)
        dtype = float_dtype_of(node.inputs[1])
        spatial = len(const_tensor(node.inputs[1]).shape) - 2
        node.replace_input_with(0, first.node.inputs[0])
        base = node.name or "merged_1x1"
        set_constant_input(graph, node, 1, weight.reshape(o, c, *([1] * spatial)).astype(dtype),
                           namer, f"{base}_weight_merged")
        if len(node.inputs) < 3:
            node.resize_inputs(3)
        set_constant_input(graph, node, 2, bias.astype(dtype), namer, f"{base}_bias_merged")
        after = node_cost(node)
        macs_before = [cost.macs for cost in before]
        self.report.applied(
            node.name, "Conv", f"merged with {first.node.name}",
            macs_before=None if None in macs_before else sum(macs_before),
            macs_after=after.macs if after.macs is not None else None,
            params_before=sum(cost.params for cost in before),
            params_after=after.params,
            details={"first": first.node.name, "channels": [c, m, o]},
        )
