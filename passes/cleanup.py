"""`cleanup`: drop what does nothing at inference — Identity, inference Dropout, duplicate
initializers, dead nodes and unused initializers — so later passes and the cost model see the
real graph.

Duplicate merging and dead-code removal reuse onnx-ir's own passes; Identity/Dropout removal is
ours because each removal is reported with its reason and graph outputs must keep their names
(onnx-ir's IdentityEliminationPass renames a value that is already a graph output).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnx_ir.passes.common import DeduplicateHashedInitializersPass
from rewriter.passes import option, register
from rewriter.passes.base import PassOptions, RewritePass

from rewriter.graph import const_array, remove_unused


@dataclass
class CleanupOptions(PassOptions):
    identity: bool = option(True, "remove Identity nodes")
    dropout: bool = option(True, "remove inference-mode Dropout nodes")
    dedupe: bool = option(True, "merge initializers with identical dtype, shape and content")
    dead: bool = option(True, "remove nodes and initializers nothing reads")


@register
class Cleanup(RewritePass):
    """Remove Identity / inference Dropout, merge duplicate initializers, drop dead code."""

    name = "cleanup"
    summary = "remove Identity/inference Dropout, merge duplicate initializers, drop dead code"
    Options = CleanupOptions
    exact = True

    def apply(self, model: ir.Model) -> None:
        opts: CleanupOptions = self.options  # type: ignore[assignment]
        for graph in model.graphs():
            for node in list(graph):
                if node.domain not in ("", "ai.onnx"):
                    continue
                if node.op_type == "Identity" and opts.identity:
                    self._bypass(graph, node, None)
                elif node.op_type == "Dropout" and opts.dropout:
                    self._bypass(graph, node, _dropout_refusal(node))
        if opts.dedupe:
            self._dedupe(model)
        if opts.dead:
            self._remove_dead(model)

    def _bypass(self, graph: ir.Graph, node: ir.Node, refusal: str | None) -> None:
        """Make the node's readers read its input instead, then drop it."""
        source, out = node.inputs[0], node.outputs[0]
        if refusal is None and source is None:
            refusal = "no input"
        if refusal is None and out.is_graph_output() and (
            source.is_graph_input() or source.is_graph_output() or source.is_initializer()
            or source.graph is not graph
        ):
            refusal = "copies a graph input, initializer, outer value or output to a graph output"
        if refusal is not None:
            self.report.skipped(node.name, node.op_type, refusal)
            return
        if out.is_graph_output():
            # The graph output keeps its name: the source value takes it over.
            name = out.name
            out.name = None
            source.name = name
            if source.shape is None:
                source.shape = out.shape
        out.replace_all_uses_with(source, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        self.report.applied(node.name, node.op_type, "removed (copies its input)")

    def _dedupe(self, model: ir.Model) -> None:
        before = {id(g): dict(g.initializers) for g in model.graphs()}
        DeduplicateHashedInitializersPass()(model)
        for graph in model.graphs():
            kept = graph.initializers
            for name, value in before[id(graph)].items():
                if name not in kept:
                    self.report.applied(name, "initializer", "duplicate initializer merged",
                                        params_before=_size(value), params_after=0)

    def _remove_dead(self, model: ir.Model) -> None:
        """onnx-ir's dead-code removal; outer-scope uses inside subgraphs are real uses there."""
        nodes = {id(n): n for g in model.graphs() for n in g}
        inits = {name: v for name, v in model.graph.initializers.items()}
        remove_unused(model)
        alive = {id(n) for g in model.graphs() for n in g}
        for key, node in nodes.items():
            if key not in alive:
                self.report.applied(node.name, node.op_type, "dead node removed")
        for name, value in inits.items():
            if name not in model.graph.initializers:
                self.report.applied(name, "initializer", "unused initializer removed",
                                    params_before=_size(value), params_after=0)


def _dropout_refusal(node: ir.Node) -> str | None:
    """Why a Dropout is not a plain copy at inference, or None when it is."""
    if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        return "Dropout mask output is used"
    if "is_test" in node.attributes and node.attributes.get_int("is_test") == 0:
        return "Dropout with is_test=0 (training mode)"
    training = node.inputs[2] if len(node.inputs) > 2 else None
    if training is not None:
        flag = const_array(training)
        if flag is None:
            return "Dropout training_mode computed at run time"
        if bool(flag.reshape(-1)[0]):
            return "Dropout in training mode"
    return None


def _size(value: ir.Value) -> int:
    tensor = value.const_value
    return int(tensor.size) if tensor is not None else 0
