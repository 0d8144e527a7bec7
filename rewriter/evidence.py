"""How much evidence a figure rests on: sample counts, narrow calibration data, honest splits.

A fidelity of 100% on 6 held-out samples, or on 200 copies of 2 faces, says little; a split a
choice was made on (target=auto's bisection, dense-head's ridge strength, distillation's
keep-or-discard) flatters the numbers measured on it. This module warns about the first two and
carves a third, never-seen *report* split for the headline when a run chooses on held-out data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from rewriter.calibration import CalibrationSet
from rewriter.errors import PassError
from rewriter.fidelity import FEW_SAMPLES, looks_like_scores

#: Two samples whose mean-centred inputs have a cosine above this are counted as one.
NEAR_DUPLICATE_COSINE = 0.995
#: Samples compared for near-duplicates (a seeded subset of larger sets).
DUPLICATE_SAMPLE_LIMIT = 512
#: Inputs are randomly projected to this many dims before comparison (cosines are kept).
PROJECTED_DIMS = 256


def check_evidence(context: Any, what: str, min_samples: int | None = None) -> None:
    """Refuse a choice made on fewer held-out samples than the minimum (lowered explicitly)."""
    need = context.min_samples if min_samples is None else int(min_samples)
    n = context.holdout.n if context.holdout is not None else 0
    if n < need:
        raise PassError(
            f"{what} would choose on {n} held-out samples, fewer than the minimum {need}: give "
            f"more --calib samples or a larger --holdout, or lower the minimum explicitly "
            f"(--min-samples {max(n, 1)})"
        )


def few_samples_warning(samples: int | None, where: str) -> str | None:
    """The warning a headline measured on fewer than `FEW_SAMPLES` samples carries."""
    if samples is None or samples >= FEW_SAMPLES:
        return None
    return (
        f"fidelity measured on only {samples} samples ({where}); below {FEW_SAMPLES} the "
        "figures are thin evidence: give more --calib samples or --eval data"
    )


def split_for_choices(
    data: CalibrationSet, holdout: float, seed: int
) -> tuple[CalibrationSet, CalibrationSet, CalibrationSet]:
    """(fit, select, report): `report` takes the `holdout` share first and is seen by no choice;
    the rest splits into fit and select with the same share."""
    rest, report = data.split(holdout, seed)
    fit, select = rest.split(holdout, seed + 1)
    return fit, select, report


def distinct_samples(data: CalibrationSet, seed: int = 0) -> tuple[int, int]:
    """(distinct, compared): samples left after merging near-duplicates of a seeded subset."""
    arrays = [np.asarray(v) for v in data.inputs.values()
              if np.issubdtype(np.asarray(v).dtype, np.number) and np.ndim(v) >= 1]
    if not arrays or data.n < 2:
        return data.n, data.n
    rng = np.random.default_rng(seed)
    index = np.sort(rng.permutation(data.n)[:DUPLICATE_SAMPLE_LIMIT])
    # Only the compared samples' chosen columns become float64 (converting the whole set
    # first copied ~0.5 GB per 100 images of 480x480)
    views = [a.reshape(len(a), -1) for a in arrays]
    width = sum(v.shape[1] for v in views)
    if width > PROJECTED_DIMS:
        columns = rng.choice(width, size=min(width, 16 * PROJECTED_DIMS), replace=False)
        flat = _columns(views, index, columns) @ rng.standard_normal((len(columns),
                                                                      PROJECTED_DIMS))
    else:
        flat = np.concatenate([v[index].astype(np.float64) for v in views], axis=1)
    flat = flat - flat.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(flat, axis=1)
    unit = flat / np.where(norms > 0, norms, 1.0)[:, None]
    zero = norms <= 1e-12 * max(float(norms.max()), 1e-300)
    representatives: list[int] = []
    for i in range(len(unit)):
        if zero[i] and any(zero[j] for j in representatives):
            continue
        if representatives and not zero[i]:
            cos = unit[representatives] @ unit[i]
            if np.max(cos) > NEAR_DUPLICATE_COSINE:
                continue
        representatives.append(i)
    return len(representatives), len(unit)


def _columns(views: list[np.ndarray], rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """`concatenate(views, axis=1)[rows][:, columns]` as float64, without the concatenation."""
    offsets = np.cumsum([0, *(v.shape[1] for v in views)])
    out = np.empty((len(rows), len(columns)))
    for i, view in enumerate(views):
        mine = (columns >= offsets[i]) & (columns < offsets[i + 1])
        out[:, mine] = view[np.ix_(rows, columns[mine] - offsets[i])]
    return out


def narrow_calibration_warnings(
    data: CalibrationSet, reference: Mapping[str, np.ndarray] | None = None, seed: int = 0
) -> list[str]:
    """Warnings when calibration holds few distinct samples or covers few classes."""
    if data.synthetic or data.n < 2:
        return []
    warnings = []
    distinct, compared = distinct_samples(data, seed)
    if distinct < 0.9 * compared:
        warnings.append(
            f"calibration is narrow: of {compared} samples compared only {distinct} are distinct "
            f"(the rest are near-copies, input cosine > {NEAR_DUPLICATE_COSINE}); fidelity and "
            "fits on it generalise poorly"
        )
    classes = _class_count(reference)
    if data.labels is not None:
        covered = len(np.unique(np.asarray(data.labels)))
        warnings += _coverage("labels", covered, classes, data.n)
    if reference is not None and classes:
        scores = next(a for a in reference.values() if looks_like_scores(a))
        covered = len(np.unique(np.argmax(scores, axis=1)))
        warnings += _coverage("the original model's top-1 predictions", covered, classes,
                              len(scores))
    return warnings


def _class_count(reference: Mapping[str, np.ndarray] | None) -> int | None:
    if reference is None:
        return None
    for array in reference.values():
        if looks_like_scores(array):
            return int(array.shape[1])
    return None


def _coverage(what: str, covered: int, classes: int | None, n: int) -> list[str]:
    need = min(classes // 2 if classes else 2, 10, max(n // 2, 2))
    if covered >= need:
        return []
    of = f" of {classes}" if classes else ""
    return [
        f"calibration is narrow: {what} cover {covered}{of} classes; fidelity measured on it "
        "says little about the others"
    ]
