"""How far the rewritten model's outputs moved from the original's, per output.

Cosine similarity, relative L2 error, max abs error and SQNR for every output; top-1/top-5
agreement when an output looks like class scores ([N, K] with K >= 2); accuracy of both models
when labels are known. Random inputs make these a smoke test only; quality claims use real data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def compare_arrays(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Cosine, relative L2, max abs error and SQNR (dB) of `candidate` against `reference`."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    got = np.asarray(candidate, dtype=np.float64).ravel()
    if ref.shape != got.shape:
        raise ValueError(f"output shapes differ: {reference.shape} vs {candidate.shape}")
    diff = got - ref
    ref_norm = float(np.linalg.norm(ref))
    got_norm = float(np.linalg.norm(got))
    err_norm = float(np.linalg.norm(diff))
    if ref_norm == 0 and got_norm == 0:
        cosine = 1.0
    elif ref_norm == 0 or got_norm == 0:
        cosine = 0.0
    else:
        cosine = float(np.dot(ref, got) / (ref_norm * got_norm))
    rel_l2 = err_norm / ref_norm if ref_norm > 0 else (0.0 if err_norm == 0 else float("inf"))
    sqnr = float("inf") if err_norm == 0 else 20.0 * np.log10(max(ref_norm, 1e-30) / err_norm)
    return {
        "cosine": cosine,
        "rel_l2": rel_l2,
        "max_abs": float(np.max(np.abs(diff))) if diff.size else 0.0,
        "sqnr_db": sqnr,
    }


def looks_like_scores(array: np.ndarray) -> bool:
    """[N, K] float output with K >= 2: class scores (logits or probabilities)."""
    return array.ndim == 2 and array.shape[1] >= 2 and np.issubdtype(array.dtype, np.floating)


def topk_agreement(reference: np.ndarray, candidate: np.ndarray, k: int) -> float:
    """Share of samples whose reference top-1 class is within the candidate's top-k."""
    ref_top1 = np.argmax(reference, axis=1)
    k = min(k, candidate.shape[1])
    cand_topk = np.argsort(-candidate, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(cand_topk == ref_top1[:, None], axis=1)))


def output_fidelity(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """Per-output metrics plus a `worst` summary (lowest cosine, largest errors)."""
    per_output: dict[str, dict[str, Any]] = {}
    for name, ref in reference.items():
        got = candidate[name]
        metrics: dict[str, Any] = compare_arrays(ref, got)
        if looks_like_scores(ref):
            metrics["top1_agreement"] = topk_agreement(ref, got, 1)
            metrics["top5_agreement"] = topk_agreement(ref, got, 5)
            if labels is not None and len(labels) == len(ref):
                metrics["accuracy_before"] = float(np.mean(np.argmax(ref, axis=1) == labels))
                metrics["accuracy_after"] = float(np.mean(np.argmax(got, axis=1) == labels))
        per_output[name] = metrics
    return {"outputs": per_output, **summarize(per_output)}


def summarize(per_output: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The worst value of each metric across outputs (what a gate should look at)."""
    summary: dict[str, Any] = {}
    rows = list(per_output.values())
    if not rows:
        return summary
    summary["cosine"] = min(r["cosine"] for r in rows)
    summary["rel_l2"] = max(r["rel_l2"] for r in rows)
    summary["max_abs"] = max(r["max_abs"] for r in rows)
    summary["sqnr_db"] = min(r["sqnr_db"] for r in rows)
    for key in ("top1_agreement", "top5_agreement"):
        values = [r[key] for r in rows if key in r]
        if values:
            summary[key] = min(values)
    for row in rows:
        if "accuracy_before" in row:
            summary["accuracy_before"] = row["accuracy_before"]
            summary["accuracy_after"] = row["accuracy_after"]
            break
    return summary
