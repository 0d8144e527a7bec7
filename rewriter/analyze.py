"""`rewrite MODEL --analyze`: per-layer cost table, largest first, with bottleneck candidates."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import onnx_ir as ir

from rewriter.cost import model_cost
from rewriter.lowrank_methods import METHODS
from rewriter.lowrank_plan import DEFAULT_RATIO, DEFAULT_ROUND, RankRule, plan_by_rule
from rewriter.lowrank_select import SelectRules, select_convs
from rewriter.shapes import with_input_shapes


@dataclass
class LayerRow:
    """One row of the analysis table."""

    node: str
    op: str
    input_shape: list[int] | None
    output_shape: list[int] | None
    kernel: list[int] | None
    macs: int | None
    share: float
    params: int
    candidate: bool = False
    rank: int | None = None
    macs_after: int | None = None
    saving: int | None = None
    note: str = ""


@dataclass
class Analysis:
    """The whole table plus totals; `to_dict` is the `--json` output (plain integers)."""

    rows: list[LayerRow]
    total_macs: int
    total_params: int
    candidate_saving: int
    unknown: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "total_macs": int(self.total_macs),
            "total_params": int(self.total_params),
            "candidate_macs_saving": int(self.candidate_saving),
            "default_ratio": DEFAULT_RATIO,
            "unknown_macs_nodes": list(self.unknown),
            "layers": [r.__dict__ for r in self.rows],
        }


def analyze(model: ir.Model, input_shapes: Mapping[str, Sequence[int]] | None = None) -> Analysis:
    """Per-layer MACs and params on a copy with dynamic dims fixed; bottleneck candidates marked."""
    fixed = with_input_shapes(model, input_shapes or {})
    cost = model_cost(fixed)
    total = cost.macs or 1
    candidates = {c.node: c for c in bottleneck_candidates(fixed)}
    rows = []
    for c in cost.nodes:
        if not c.macs and not c.params:
            continue
        row = LayerRow(
            node=c.name,
            op=c.op_type,
            input_shape=list(c.input_shape) if c.input_shape else None,
            output_shape=list(c.output_shape) if c.output_shape else None,
            kernel=list(c.kernel) if c.kernel else None,
            macs=c.macs,
            share=(c.macs or 0) / total,
            params=c.params,
        )
        cand = candidates.get(c.name)
        if cand is not None:
            row.candidate, row.rank, row.macs_after = True, cand.rank, cand.macs_after
            row.saving = (c.macs or 0) - cand.macs_after
        rows.append(row)
    rows.sort(key=lambda r: -(r.macs or 0))
    saving = sum(r.saving or 0 for r in rows)
    return Analysis(rows, cost.macs, cost.params, saving, cost.unknown)


@dataclass
class Candidate:
    node: str
    rank: int
    macs_before: int
    macs_after: int


def bottleneck_candidates(
    model: ir.Model, ratio: float = DEFAULT_RATIO, multiple: int = DEFAULT_ROUND,
    rules: SelectRules | None = None,
) -> list[Candidate]:
    """The convs `bottleneck` would rewrite at `ratio` (its selection rule and rank rule, so
    `--analyze` and the pass cannot disagree): where a 1x1 reduce saves MACs."""
    selection = select_convs(model, rules or SelectRules(), analysis=model)
    method = METHODS["in"]
    plan = plan_by_rule(selection.layers, method, {}, RankRule(ratio=ratio, multiple=multiple))
    return [Candidate(layer.name, plan.ranks[layer.index].r, layer.macs,
                      method.macs_after(layer, plan.ranks[layer.index]))
            for layer in selection.layers if layer.index in plan.ranks]
