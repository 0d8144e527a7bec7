"""Quality gates: turn fidelity, the user's metric and latency into pass/fail lines.

`min-cosine` reads the worst output group's cosine; alongside it, `max-flip` fails when more
than `DEFAULT_MAX_FLIP` of a score group's thresholded decisions flip (a detector that loses
detections can keep every cosine above 0.99). `max-drop` reads the user's metric when one was
given (the drop of its primary value), else accuracy with labels, else top-1 disagreement.
"""

from __future__ import annotations

from typing import Any

#: Share of thresholded score decisions allowed to flip when a fidelity gate is asked for.
DEFAULT_MAX_FLIP = 0.02


def evaluate_gates(
    report: Any,
    max_drop: float | None = None,
    min_cosine: float | None = None,
    min_speedup: float | None = None,
    max_flip: float | None = None,
) -> list[dict[str, Any]]:
    """One entry per requested gate. A gate whose measurement is missing fails and says why."""
    gates: list[dict[str, Any]] = []
    fidelity = report.fidelity or {}
    metric = getattr(report, "metric", None) or {}
    if max_drop is not None:
        gates.append(_drop_gate(fidelity, metric, max_drop))
    if min_cosine is not None:
        if "cosine" in fidelity:
            cos = fidelity["cosine"]
            where = fidelity.get("cosine_group", "output")
            gates.append(_gate("min-cosine", cos >= min_cosine, cos, min_cosine,
                               f"worst group {where} cosine"))
        else:
            gates.append(_missing("min-cosine", "needs --calib"))
    if max_flip is None and min_cosine is not None:
        max_flip = DEFAULT_MAX_FLIP
    if max_flip is not None:
        flips = [(k, fidelity[k]) for k in ("flip@0.25", "flip@0.5") if k in fidelity]
        if flips:
            key, worst = max(flips, key=lambda kv: kv[1])
            group = _flip_group(fidelity, key)
            gates.append(_gate("max-flip", worst <= max_flip, worst, max_flip,
                               f"score decisions flipped {key} in {group}"))
    if min_speedup is not None:
        latency = report.latency or {}
        if "speedup" in latency:
            s = latency["speedup"]["median"]
            gates.append(_gate("min-speedup", s >= min_speedup, s, min_speedup, "median speedup"))
        else:
            gates.append(_missing("min-speedup", "needs --bench"))
    return gates


def _drop_gate(fidelity: dict, metric: dict, max_drop: float) -> dict[str, Any]:
    if "drop" in metric:
        what = f"metric {metric['primary']} drop ({metric['before']:.4g} -> {metric['after']:.4g})"
        return _gate("max-drop", metric["drop"] <= max_drop, metric["drop"], max_drop, what)
    if "accuracy_before" in fidelity:
        drop = fidelity["accuracy_before"] - fidelity["accuracy_after"]
        return _gate("max-drop", drop <= max_drop, drop, max_drop, "accuracy drop")
    if "top1_agreement" in fidelity:
        drop = 1.0 - fidelity["top1_agreement"]
        return _gate("max-drop", drop <= max_drop, drop, max_drop, "top-1 disagreement")
    return _missing("max-drop", "needs --metric, or --calib with class-score outputs")


def _flip_group(fidelity: dict, key: str) -> str:
    groups = fidelity.get("groups") or {}
    scored = [(label, g[key]) for label, g in groups.items() if key in g]
    return max(scored, key=lambda kv: kv[1])[0] if scored else "a score group"


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
