"""Passes registered only by the tests: they exercise the CLI and gates without the real passes.

`test-identity` is exact and touches nothing; `test-perturb` scales every Conv's weight by
(1 + eps), moving the outputs by a known, controllable amount (so gates can pass or fail on
purpose). Import this module (or run `python -m tests.cli_entry`) to register them.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from passes import PassOptions, RewritePass, option, register
from rewriter.graph import Namer, const_array, nodes_by_op, set_constant_input


@register
class IdentityPass(RewritePass):
    name = "test-identity"
    summary = "(tests only) records every Conv as skipped; changes nothing"
    exact = True

    def apply(self, model: ir.Model) -> None:
        for node in nodes_by_op(model, ["Conv"]):
            self.report.skipped(node.name, node.op_type, "identity: nothing to do")


@register
class PerturbPass(RewritePass):
    name = "test-perturb"
    summary = "(tests only) scales each Conv weight by 1+eps"

    @dataclass
    class Options(PassOptions):
        eps: float = option(0.01, "relative change of every Conv weight")
        only: str = option("", "only Conv nodes whose name contains this (all when empty)")

    def apply(self, model: ir.Model) -> None:
        namer = Namer(model)
        for node in nodes_by_op(model, ["Conv"]):
            if self.options.only not in node.name:
                self.report.skipped(node.name, node.op_type, f"name lacks {self.options.only!r}")
                continue
            weight = const_array(node.inputs[1])
            if weight is None:
                self.report.skipped(node.name, node.op_type, "weight computed at run time")
                continue
            set_constant_input(model.graph, node, 1, weight * (1 + self.options.eps), namer,
                               f"{node.name}_W")
            reason = f"weight scaled by {1 + self.options.eps:g}"
            self.report.applied(node.name, node.op_type, reason)
