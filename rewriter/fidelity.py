"""How far the rewritten model's outputs moved from the original's, per output group.

Per group (`rewriter.groups`): cosine similarity (1 is identical direction), relative L2 error
(|b - a| / |a|, 0 is identical), max abs error, SQNR in dB (higher is better; 40 dB is a
rel L2 of 1%). Score groups (values in [0, 1]) also get the share of thresholded decisions that
flip at 0.25 and 0.5 (`flip@0.25`, `flip@0.5`): over the positions where *either* model is above
the threshold (the union), the share where only one is. Counting over every position would let
the ~99% background anchors of a detector dilute a lost detection to nothing; the union size is
reported as `decisions@T`.

`task_error` is one lower-is-better number on the scale of `1 - cosine`: the worst group's

    max(1 - cosine, rel_l2**2 / 2, FLIP_WEIGHT * max(flip@0.25, flip@0.5))

(`rel_l2**2 / 2` equals `1 - cosine` for noise that keeps the norm, and also catches a scale
drift cosine cannot see; `FLIP_WEIGHT` = 0.25 makes 4% flipped decisions weigh as much as a
cosine of 0.99). So `task_error <= 1 - min_cosine` reads: every group's cosine >= min_cosine,
rel L2 <= sqrt(2 (1 - min_cosine)), and at most 4 (1 - min_cosine) of score decisions flip.
Calibrated on the trained digit detector (bottleneck refit on its test set): 4.5% flips at
0.5 came with mAP@0.5 -0.2 points, 7% with -0.7, 17% with -1.8; so the default (4% at
min-cosine 0.99) keeps well inside a 1-point mAP loss, and a rewrite flipping >= 5% fails.

`task_error(..., smooth=True)` counts flips smoothly (`smooth_flip_rate`: each decision a ramp
of `SMOOTH_WIDTH` = 0.1 around its threshold). The low-rank passes measure with it: a
single-layer trial on ~24 held-out images flips a handful of decisions, and whole flips make
that measurement coarse (one flip is 0.1% of task error) where the drift towards the threshold
says the same thing more finely. Reports, gates and `target=auto`'s default verdict
(`judge_candidate`) count whole flips.

Also top-1/top-5 agreement when an output looks like class scores ([N, K] with K >= 2), and
accuracy of both models when labels are known. Whole-tensor numbers are kept under
`whole_tensor` for reference only: a detector's box pixels dominate them. Every figure carries
its sample count. Random inputs make these a smoke test only; quality claims use real data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rewriter.groups import OutputGroup, bind_groups, find_groups

#: Score thresholds whose decisions are compared (`flip@0.25`, `flip@0.5`).
FLIP_THRESHOLDS = (0.25, 0.5)
#: Weight of the flip rate in `task_error` (4% flips ~ cosine 0.99).
FLIP_WEIGHT = 0.25
#: task_error is capped here so a dead group (zero reference) stays finite in reports.
MAX_TASK_ERROR = 2.0
#: Below this many samples the terminal and report warn that the figures are thin evidence.
FEW_SAMPLES = 32


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
    if err_norm == 0:
        cosine = 1.0  # identical: exactly 1, not 1 - 2e-16 from rounding the norms
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


def flip_rate(reference: np.ndarray, candidate: np.ndarray, threshold: float) -> tuple[float, int]:
    """Share of thresholded decisions that differ, over positions where either is above."""
    ref = np.asarray(reference) > threshold
    got = np.asarray(candidate) > threshold
    union = int(np.count_nonzero(ref | got))
    if union == 0:
        return 0.0, 0
    return float(np.count_nonzero(ref ^ got)) / union, union


#: Width of the ramp a smooth flip count puts around each threshold.
SMOOTH_WIDTH = 0.1


def smooth_flip_rate(reference: np.ndarray, candidate: np.ndarray, threshold: float,
                     width: float = SMOOTH_WIDTH) -> tuple[float, int]:
    """`flip_rate` with each decision a ramp of `width` around the threshold: a score that
    drifts towards the threshold counts part of a flip, so a few samples measure it less
    coarsely than whole flips do (same union, same scale: a full flip counts 1)."""
    ref, got = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    union = int(np.count_nonzero((ref > threshold) | (got > threshold)))
    if union == 0:
        return 0.0, 0
    def ramp(x: np.ndarray) -> np.ndarray:
        return np.clip((x - threshold) / width + 0.5, 0.0, 1.0)
    near = (ref > threshold - width / 2) | (got > threshold - width / 2)
    return float(np.sum(np.abs(ramp(ref[near]) - ramp(got[near])))) / union, union


def group_metrics(group: OutputGroup, reference: np.ndarray, candidate: np.ndarray,
                  smooth: bool = False) -> dict[str, Any]:
    """All metrics of one group, its sample count and its task error."""
    ref, got = group.select(reference), group.select(candidate)
    metrics: dict[str, Any] = {
        "output": group.output,
        "name": group.name,
        "kind": group.kind,
        "axis": group.axis,
        "rows": group.rows,
        "samples": int(len(reference)) if np.ndim(reference) else 1,
        **compare_arrays(ref, got),
    }
    if group.kind == "score":
        for t in FLIP_THRESHOLDS:
            rate, union = (smooth_flip_rate if smooth else flip_rate)(ref, got, t)
            metrics[f"flip@{t:g}"] = rate
            metrics[f"decisions@{t:g}"] = union
    metrics["task_error"] = group_error(metrics)
    return metrics


def group_error(metrics: Mapping[str, Any]) -> float:
    """The task error of one group's metrics (formula in the module docstring)."""
    terms = [1.0 - float(metrics["cosine"]), float(metrics["rel_l2"]) ** 2 / 2]
    flips = [float(metrics[f"flip@{t:g}"]) for t in FLIP_THRESHOLDS if f"flip@{t:g}" in metrics]
    if flips:
        terms.append(FLIP_WEIGHT * max(flips))
    error = max(terms)
    return MAX_TASK_ERROR if not np.isfinite(error) else min(max(error, 0.0), MAX_TASK_ERROR)


def measured_groups(
    reference: Mapping[str, np.ndarray], groups: Sequence[OutputGroup] | None
) -> list[OutputGroup]:
    """`groups` checked and completed against these outputs; automatic groups when none."""
    return bind_groups(groups, reference) if groups else find_groups(reference)


def task_error(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    groups: Sequence[OutputGroup] | None = None,
    prebound: bool = False,
    smooth: bool = False,
) -> float:
    """The worst group's task error (lower is better; 0 is identical). What sensitivity,
    allocation, `target=auto`, gates and quantize auto-exclusion read. `prebound`: `groups` are
    already `measured_groups(reference, ...)` (a sweep of hundreds of trials binds them once)."""
    bound = list(groups or ()) if prebound else measured_groups(reference, groups)
    return max(
        (group_metrics(g, reference[g.output], candidate[g.output], smooth)["task_error"]
         for g in bound),
        default=0.0,
    )


def worst_group_rel_l2(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    groups: Sequence[OutputGroup] | None = None,
) -> float:
    """The largest relative L2 error over the output groups: what the numerical guard bounds,
    so a pass that declares its own bound must measure it the same way."""
    groups_metrics = task_fidelity(reference, candidate, groups)["groups"].values()
    return max((g["rel_l2"] for g in groups_metrics), default=0.0)


def task_fidelity(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    groups: Sequence[OutputGroup] | None = None,
    labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """Per-group metrics, the worst group, the sample count, and per-output task metrics.

    Keys: `groups` (label -> metrics), `worst` (the group with the largest task error, its
    label under `group`), `task_error`, `samples`; `cosine`, `rel_l2`, `max_abs`, `sqnr_db`
    and the flip rates as the worst value over groups (what gates read); `outputs` (per output:
    top-k agreement and accuracy where the output is class scores); `whole_tensor` (per-output
    metrics over the whole tensor, for reference only).
    """
    for name in reference:
        if name not in candidate:
            raise ValueError(f"candidate has no output '{name}'")
    bound = measured_groups(reference, groups)
    per_group = {
        g.label: group_metrics(g, reference[g.output], candidate[g.output]) for g in bound
    }
    whole = output_fidelity(reference, candidate, labels)
    result: dict[str, Any] = {"groups": per_group, "samples": _samples(reference)}
    if per_group:
        worst_label = max(per_group, key=lambda k: per_group[k]["task_error"])
        result["worst"] = {"group": worst_label, **per_group[worst_label]}
        result["task_error"] = per_group[worst_label]["task_error"]
        rows = list(per_group.values())
        result["cosine"] = min(r["cosine"] for r in rows)
        result["cosine_group"] = min(per_group, key=lambda k: per_group[k]["cosine"])
        result["rel_l2"] = max(r["rel_l2"] for r in rows)
        result["max_abs"] = max(r["max_abs"] for r in rows)
        result["sqnr_db"] = min(r["sqnr_db"] for r in rows)
        for t in FLIP_THRESHOLDS:
            key = f"flip@{t:g}"
            flips = [r[key] for r in rows if key in r]
            if flips:
                result[key] = max(flips)
    task_keys = ("top1_agreement", "top5_agreement", "accuracy_before", "accuracy_after")
    result["outputs"] = {
        name: {k: v for k, v in m.items() if k in task_keys}
        for name, m in whole["outputs"].items()
        if any(k in m for k in task_keys)
    }
    result.update({k: whole[k] for k in task_keys if k in whole})
    result["whole_tensor"] = {
        "note": "over each whole output; a large-scale group dominates these, so gates and "
        "headlines read the per-group numbers",
        "outputs": {
            name: {k: v for k, v in m.items() if k not in task_keys}
            for name, m in whole["outputs"].items()
        },
    }
    return result


def _samples(outputs: Mapping[str, np.ndarray]) -> int:
    for array in outputs.values():
        return int(len(array)) if np.ndim(array) else 1
    return 0


#: Largest drop of a user metric's primary value `target=auto` accepts when none is given.
DEFAULT_METRIC_DROP = 0.01


@dataclass
class Judgement:
    """Whether a candidate model is good enough for a choice, and the numbers that said so."""

    ok: bool
    error: float
    detail: str
    metric: Any = None


def judge_candidate(
    trial: Any, reference: Mapping[str, np.ndarray], context: Any, min_cosine: float
) -> Judgement:
    """The criterion a choice (target=auto) applies to one trial model on the held-out split.

    Without a user metric: `task_error <= 1 - min_cosine` over the run's output groups. With
    one (`context.metric`): the drop of its primary value from the original's must be at most
    `context.max_drop` (default `DEFAULT_METRIC_DROP`); the task error is still reported.
    """
    from rewriter import runtime

    got = runtime.run_all(trial, context.holdout.inputs)
    error = task_error(reference, got, context.groups)
    if context.metric is not None and context.metric_baseline is not None:
        value = context.metric.evaluate_model(trial)
        base = context.metric_baseline
        drop = base.primary - value.primary
        limit = DEFAULT_METRIC_DROP if context.max_drop is None else context.max_drop
        detail = (f"{base.primary_name} {value.primary:.4g} (drop {drop:.4g}, limit {limit:.4g}), "
                  f"task error {error:.4g}")
        return Judgement(drop <= limit, error, detail, value)
    limit = 1.0 - min_cosine
    return Judgement(error <= limit, error, f"task error {error:.4g} (limit {limit:.4g})")
