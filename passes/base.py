"""The shared pass protocol: an onnx-ir in-place pass with typed options and a report.

A pass subclasses `RewritePass`, declares `name`, an `Options` dataclass (each field made by
`option(default, help, ge=..., le=...)`, documented by `rewrite --list-passes`) and implements
`apply`, which decides per candidate node (pattern, check with a named reason, rewrite) and
records every decision in `self.report`. Dead nodes and initializers are removed and shapes
re-inferred after any pass that changed the graph, so passes never clean up by hand.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import onnx_ir as ir

from rewriter import options as _options
from rewriter.context import PassContext
from rewriter.graph import remove_unused
from rewriter.options import describe_options, option
from rewriter.report import PassReport
from rewriter.shapes import infer_shapes


@dataclasses.dataclass
class PassOptions:
    """Base for a pass's options; subclasses add fields made by `option(default, help, ge=...)`."""


class RewritePass(ir.passes.InPlacePass):
    """Base class of every onexone pass."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Options: ClassVar[type[PassOptions]] = PassOptions
    #: True when the rewrite keeps outputs unchanged up to float rounding (checked by the guard).
    exact: ClassVar[bool] = False
    #: True when nothing may follow this pass in a pipeline (its output is not our IR's kind of
    #: graph to rewrite further, e.g. a QDQ int8 model).
    runs_last: ClassVar[bool] = False

    def __init__(
        self,
        options: PassOptions | Mapping[str, Any] | None = None,
        context: PassContext | None = None,
    ) -> None:
        super().__init__()
        self.options = (
            options
            if isinstance(options, PassOptions)
            else parse_options(self.Options, options or {}, self.name)
        )
        self.context = context or PassContext()
        self.report = PassReport(self.name, exact=self.exact)

    @classmethod
    def parse(cls, raw: PassOptions | str | Mapping[str, Any] | None) -> PassOptions:
        """This pass's options from `key=value` text or a mapping; mistakes fail here, before
        any work (a usage error naming the pass and the option)."""
        if isinstance(raw, PassOptions):
            return raw
        return parse_options(cls.Options, raw or {}, cls.name)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.report = PassReport(
            self.name, options=dataclasses.asdict(self.options), exact=self.exact
        )
        self.apply(model)
        modified = self.report.n_applied > 0
        if modified:
            remove_unused(model)
            infer_shapes(model, strict=False)
        elif not self.report.decisions:
            self.report.note("nothing to do: no candidate node in this model")
        return ir.passes.PassResult(model, modified)

    def chooses_on_holdout(self) -> bool:
        """True when the pass makes a choice on the held-out split (numbers measured there are
        then optimistic, so the run measures its headline on a split no choice saw)."""
        return False

    @abstractmethod
    def apply(self, model: ir.Model) -> None:
        """Rewrite `model` in place, recording a decision for every candidate in `self.report`."""


# ------------------------------------------------------------------------------ options


def parse_options(
    cls: type[PassOptions], raw: str | Mapping[str, Any] | None, pass_name: str
) -> PassOptions:
    """Build `cls` from `key=value` text or a mapping of text (CLI) or typed values (API, TOML).

    The grammar, the range checks (finite; not negative unless declared) and the "did you mean"
    live in `rewriter.options`, shared with distillation and preprocessing.
    """
    return _options.parse_options(cls, raw, f"pass '{pass_name}'")


__all__ = ["PassOptions", "RewritePass", "describe_options", "option", "parse_options"]
