"""Reports: what each pass decided per node, and the run's totals, fidelity and latency.

The JSON form has a stable, versioned schema (`SCHEMA_VERSION`; see `docs/report-schema.json`);
counts are plain integers so pipelines can compare them without parsing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = "2.0"


@dataclass
class NodeDecision:
    """One candidate node: applied or skipped, why, and its cost before/after."""

    node: str
    op: str
    applied: bool
    reason: str
    macs_before: int | None = None
    macs_after: int | None = None
    params_before: int | None = None
    params_after: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["decision"] = "applied" if self.applied else "skipped"
        return out


@dataclass
class PassReport:
    """What one pass did. `exact` passes promise unchanged outputs (checked by the guard)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    decisions: list[NodeDecision] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    exact: bool = False
    error_bound: float | None = None  # declared max relative output error, if any
    metrics: dict[str, Any] = field(default_factory=dict)

    def applied(self, node: str, op: str, reason: str = "applied", **kw: Any) -> NodeDecision:
        decision = NodeDecision(node, op, True, reason, **kw)
        self.decisions.append(decision)
        return decision

    def skipped(self, node: str, op: str, reason: str, **kw: Any) -> NodeDecision:
        decision = NodeDecision(node, op, False, reason, **kw)
        self.decisions.append(decision)
        return decision

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def n_applied(self) -> int:
        return sum(d.applied for d in self.decisions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "options": jsonable(self.options),
            "exact": self.exact,
            "error_bound": self.error_bound,
            "applied": self.n_applied,
            "skipped": len(self.decisions) - self.n_applied,
            "notes": list(self.notes),
            "metrics": jsonable(self.metrics),
            "decisions": [jsonable(d.to_dict()) for d in self.decisions],
        }


@dataclass
class RunReport:
    """A whole rewrite: inputs, passes, totals, and (when measured) fidelity and latency."""

    model: str | None
    output: str | None = None
    passes: list[PassReport] = field(default_factory=list)
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    file_size_before: int | None = None
    file_size_after: int | None = None
    fidelity: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    #: The user's metric (`--metric`): both values, the drop and how often it ran.
    metric: dict[str, Any] | None = None
    gates: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    tool: dict[str, Any] = field(default_factory=dict)
    written: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "versions": versions(),
            "model": self.model,
            "output": self.output,
            "written": self.written,
            "options": jsonable(self.options),
            "macs_before": int(self.macs_before),
            "macs_after": int(self.macs_after),
            "params_before": int(self.params_before),
            "params_after": int(self.params_after),
            "file_size_before": self.file_size_before,
            "file_size_after": self.file_size_after,
            "passes": [p.to_dict() for p in self.passes],
            "fidelity": jsonable(self.fidelity),
            "latency": jsonable(self.latency),
            "metric": jsonable(self.metric),
            "gates": jsonable(self.gates),
            "warnings": list(self.warnings),
            "tool": jsonable(self.tool),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def to_markdown(self) -> str:
        from rewriter.render import run_report_markdown

        return run_report_markdown(self)


def versions() -> dict[str, str]:
    """Versions of the tools that produced a report (for reproducibility)."""
    import onnx
    import onnx_ir
    import onnxruntime

    from rewriter import __version__

    return {
        "onexone": __version__,
        "onnx": onnx.__version__,
        "onnx_ir": onnx_ir.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def jsonable(obj: Any) -> Any:
    """numpy scalars/arrays and tuples to plain JSON types; NaN/inf to None."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
