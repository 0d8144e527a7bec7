"""Which elementwise activation a conv's output feeds, read from the graph.

A refit that matches the original layer's output *after* its activation needs to know the
activation, and may only do so when the conv feeds nothing else: then the activation's output
is all the rest of the model sees of this conv. SiLU appears in exports as `y * Sigmoid(y)`.
"""

from __future__ import annotations

import onnx_ir as ir


def following_activation(value: ir.Value, graph_outputs: set[int] | None = None) -> str | None:
    """"Silu" or "Relu" when `value` feeds only that activation (and is no graph output),
    else None (the pre-activation output is then what must match)."""
    if graph_outputs is not None and id(value) in graph_outputs:
        return None
    users = {id(u.node): u.node for u in value.uses()}
    nodes = list(users.values())
    if len(nodes) == 1 and _is(nodes[0], "Relu"):
        return "Relu"
    if len(nodes) == 2:
        sig = next((n for n in nodes if _is(n, "Sigmoid")), None)
        mul = next((n for n in nodes if _is(n, "Mul")), None)
        if sig is None or mul is None or sig.inputs[0] is not value:
            return None
        s = sig.outputs[0]
        if {id(v) for v in mul.inputs} == {id(value), id(s)} and len(list(s.uses())) == 1:
            if graph_outputs is None or id(s) not in graph_outputs:
                return "Silu"
    return None


def _is(node: ir.Node, op: str) -> bool:
    return node.op_type == op and node.domain in ("", "ai.onnx")
