"""Quality gates: turn fidelity and latency into pass/fail lines a pipeline can act on."""

from __future__ import annotations

from typing import Any

from rewriter.report import RunReport


def evaluate_gates(
    report: RunReport,
    max_drop: float | None = None,
    min_cosine: float | None = None,
    min_speedup: float | None = None,
) -> list[dict[str, Any]]:
    """One entry per requested gate. A gate whose measurement is missing fails and says why."""
    gates: list[dict[str, Any]] = []
    fidelity = report.fidelity or {}
    if max_drop is not None:
        if "accuracy_before" in fidelity:
            drop = fidelity["accuracy_before"] - fidelity["accuracy_after"]
            gates.append(_gate("max-drop", drop <= max_drop, drop, max_drop, "accuracy drop"))
        elif "top1_agreement" in fidelity:
            drop = 1.0 - fidelity["top1_agreement"]
            gates.append(_gate("max-drop", drop <= max_drop, drop, max_drop, "top-1 disagreement"))
        else:
            gates.append(_missing("max-drop", "needs --calib with class-score outputs"))
    if min_cosine is not None:
        if "cosine" in fidelity:
            cos = fidelity["cosine"]
            gates.append(
                _gate("min-cosine", cos >= min_cosine, cos, min_cosine, "worst output cosine")
            )
        else:
            gates.append(_missing("min-cosine", "needs --calib"))
    if min_speedup is not None:
        latency = report.latency or {}
        if "speedup" in latency:
            s = latency["speedup"]["median"]
            gates.append(_gate("min-speedup", s >= min_speedup, s, min_speedup, "median speedup"))
        else:
            gates.append(_missing("min-speedup", "needs --bench"))
    return gates


def _gate(name: str, passed: bool, value: float, limit: float, what: str) -> dict[str, Any]:
    return {
        "name": name,
        "passed": bool(passed),
        "value": float(value),
        "limit": float(limit),
        "detail": f"{what} {value:.4g} vs limit {limit:.4g}",
    }


def _missing(name: str, why: str) -> dict[str, Any]:
    return {"name": name, "passed": False, "value": None, "limit": None, "detail": why}
