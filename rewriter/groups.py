"""Output groups: slices of an output's feature axis that hold one kind of quantity.

A whole-tensor metric is only as good as the tensor is uniform. A YOLOv8 export concatenates box
coordinates in pixels (hundreds) with sigmoid class scores (near 0) in one `[N, 4 + C, A]`
output, so its cosine is the box cosine. Fidelity is therefore measured per group, and the
worst group is what gates and `target=auto` read.

Automatic rule (`find_groups`, on the original model's outputs over calibration data):

1. Feature axis: axis 1 for `[N, F]` and `[N, C, ...]` (4-D and more: NCHW channels); for 3-D
   outputs the smaller of axes 1 and 2, so both detector layouts `[N, 4+C, A]` and
   `[N, A, 4+C]` split their 4 + C rows. Outputs with fewer than 2 dims, a feature axis of
   size 1, or non-float values are one group over the whole tensor (`axis=None`).
2. Along the feature axis, every row (index) whose values all lie in [0, 1] is *bounded*; a
   contiguous run of bounded rows is a `score` group, split where rows go from sparse (median
   below `SPARSE_MEDIAN`: a trained detector's class score, near 0 at most positions) to dense
   (median at least `DENSE_MEDIAN`: normalised box coordinates, which DETR-style and
   normalising YOLO exports put in [0, 1] beside the scores; in one group their ~0.5 values
   would drown the class decisions). A run with any row in between (an untrained model's
   scores, say) is not split, except that a row on almost everywhere (median at least
   `ALWAYS_ON`: a softmax's background class beside the face class) is always split off: over
   the union of positions its decisions would dilute the rare class's flips to nothing.
   A contiguous run of unbounded rows is a `value` group, split where a row's RMS would make
   the run's largest RMS more than 10x its smallest (so pixel coordinates and unit-scale
   offsets are not averaged together).
3. Interleaved rows: a pose or face-landmark head (YOLOv8-pose, YOLOv8-face) appends keypoints
   as (x, y, visibility) triples after its box and score rows, so step 2 finds a run per
   coordinate. Where the rows after the first score run repeat one pattern (bounded, or
   unbounded of one decade of RMS) to the end (period 2-6, at least twice), that tail becomes
   one strided group per position in the period (`value3` = rows 5-53%3: every keypoint's x),
   and the runs before it stay as step 2 made them: on `[1, 4 + 1 + 17x3, A]` box, score, x,
   y, visibility.
4. More than `MAX_AUTO_GROUPS` groups in one output otherwise (an embedding whose dims differ in
   scale) falls back to one group over the whole output.

On a YOLOv8 `[1, 4 + 10, A]` output this gives rows 0-3 (`value`) and 4-13 (`score`).

User-given groups (`--groups`, TOML `groups`, `rewrite(groups=...)`) use a syntax that pastes
into bash unquoted: `OUTPUT:NAME=START-STOP+NAME=START-STOP`, rows inclusive, e.g.
`output0:box=0-3+cls=4-13`. A row range may end in `/score` or `/value`; without it the kind is
read off the data (bounded in [0, 1] -> score); `START-STOP%K` takes every K-th row from START
(`kx=5-53%3`). `axis=K` among the groups picks the axis
(default 1). Several outputs: separate them with `,` or repeat the flag. Rows of an output the
user did not cover, and outputs the user did not name, get automatic groups.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from rewriter.errors import UsageError

#: Rows whose RMS differs by more than this factor do not share a value group.
SCALE_RATIO = 10.0
#: Tolerance for "lies in [0, 1]" (float rounding of a sigmoid or softmax).
BOUND_TOLERANCE = 1e-6
#: A bounded row whose median is at least this is dense (a coordinate) ...
DENSE_MEDIAN = 0.1
#: ... and below this sparse (a class score); bounded runs with rows in between stay whole.
SPARSE_MEDIAN = 0.01
#: A bounded row whose median is at least this is on almost everywhere (a background class).
ALWAYS_ON = 0.9
#: Values per row the median is taken over (an evenly spaced subsample of larger rows).
MEDIAN_SAMPLES = 100_000
#: More automatic groups than this in one output: one group over the whole output instead.
MAX_AUTO_GROUPS = 8
#: Periods (in rows) an interleaved tail of rows is looked for at (keypoint pairs to sextuples).
TAIL_PERIODS = range(2, 7)

Kind = Literal["score", "value"]
Run = tuple[int, int, Kind, int]  # start, stop, kind, step (1 but in an interleaved tail)


@dataclass(frozen=True)
class OutputGroup:
    """Rows `start:stop:step` (a Python slice, stop exclusive) of `output` along `axis`.

    `axis=None` is the whole output; `step` > 1 is an interleaved quantity (a keypoint's x).
    `kind` is `score` (values in [0, 1]: thresholded decisions are also measured) or `value`.
    `kind_from_data` marks a user group whose kind was not given; `bind_groups` reads it off
    the data.
    """

    output: str
    name: str
    axis: int | None
    start: int
    stop: int | None
    kind: Kind = "value"
    kind_from_data: bool = False
    step: int = 1

    @property
    def label(self) -> str:
        """`output0:cls` (the name reports and gates use); a whole output is its own name."""
        return self.output if self.axis is None and self.name == self.output else (
            f"{self.output}:{self.name}"
        )

    @property
    def rows(self) -> str:
        """Inclusive row range as the user syntax writes it (`4-13`), `all` for a whole output."""
        if self.axis is None or self.stop is None:
            return "all"
        last = self.indices()[-1]
        if self.step > 1:
            return f"{self.start}-{last}%{self.step}"
        return f"{self.start}-{last}" if last != self.start else str(self.start)

    def indices(self) -> range:
        """The rows of the feature axis this group covers (needs `stop`)."""
        assert self.stop is not None
        return range(self.start, self.stop, self.step)

    def select(self, array: np.ndarray) -> np.ndarray:
        """The group's part of one output array."""
        if self.axis is None:
            return array
        index = [slice(None)] * array.ndim
        index[self.axis] = slice(self.start, self.stop, self.step)
        return array[tuple(index)]

    def describe(self) -> str:
        """`output0:cls rows 4-13 of axis 1 (score)`."""
        if self.axis is None:
            return f"{self.label} (whole output, {self.kind})"
        return f"{self.label} rows {self.rows} of axis {self.axis} ({self.kind})"


def feature_axis(shape: Sequence[int]) -> int | None:
    """The axis whose rows hold different quantities, or None when there is none to split."""
    if len(shape) < 2:
        return None
    if len(shape) == 3:
        axis = 1 if shape[1] <= shape[2] else 2
    else:
        axis = 1
    return axis if shape[axis] > 1 else None


def find_groups(reference_outputs: Mapping[str, np.ndarray]) -> list[OutputGroup]:
    """Automatic groups for every output (the rule in the module docstring)."""
    groups: list[OutputGroup] = []
    for name, array in reference_outputs.items():
        groups.extend(_output_groups(name, np.asarray(array)))
    return groups


def _output_groups(output: str, array: np.ndarray) -> list[OutputGroup]:
    axis = feature_axis(array.shape) if np.issubdtype(array.dtype, np.floating) else None
    if axis is None or array.size == 0:
        kind: Kind = "score" if array.size and _bounded(array) else "value"
        return [OutputGroup(output, output, None, 0, None, kind)]
    runs = _auto_runs(*row_statistics(array, axis))
    if runs is None:
        return [OutputGroup(output, output, None, 0, None, "value")]
    if len(runs) == 1:
        return [OutputGroup(output, output, None, 0, None, runs[0][2])]
    return _named(output, axis, runs)


def _auto_runs(bounded: np.ndarray, rms: np.ndarray, dense: np.ndarray) -> list[Run] | None:
    """Rules 2-4 on one stretch of rows; None where it would give too many groups."""
    runs = _runs(bounded, rms, dense)
    if len(runs) > MAX_AUTO_GROUPS:
        runs = _interleaved(runs, bounded, rms) or []
        if not runs or len(runs) > MAX_AUTO_GROUPS:
            return None
    return runs


def row_statistics(array: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of `axis`: whether all its values lie in [0, 1], its RMS, and whether it is a
    dense bounded row its run may be split at (`_dense_rows`)."""
    rows = np.moveaxis(np.asarray(array, dtype=np.float64), axis, 0).reshape(array.shape[axis], -1)
    finite = np.where(np.isfinite(rows), rows, np.nan)
    lo = np.nanmin(finite, axis=1)
    hi = np.nanmax(finite, axis=1)
    bounded = (lo >= -BOUND_TOLERANCE) & (hi <= 1 + BOUND_TOLERANCE)
    rms = np.sqrt(np.nanmean(finite**2, axis=1))
    every = max(1, finite.shape[1] // MEDIAN_SAMPLES)
    median = np.nan_to_num(np.nanmedian(finite[:, ::every], axis=1))
    return bounded, np.nan_to_num(rms), _dense_rows(bounded, median)


def _dense_rows(bounded: np.ndarray, median: np.ndarray) -> np.ndarray:
    """Dense rows of bounded runs whose rows are all clearly dense or clearly sparse (runs with
    any row between `SPARSE_MEDIAN` and `DENSE_MEDIAN` are not split), and rows on almost
    everywhere (`ALWAYS_ON`) in any run."""
    dense = np.zeros(len(bounded), dtype=bool)
    i = 0
    while i < len(bounded):
        j = i + 1
        while j < len(bounded) and bounded[j] == bounded[i]:
            j += 1
        part = median[i:j]
        if bounded[i] and np.all((part >= DENSE_MEDIAN) | (part < SPARSE_MEDIAN)):
            dense[i:j] = part >= DENSE_MEDIAN
        elif bounded[i]:
            dense[i:j] = part >= ALWAYS_ON
        i = j
    return dense


def _runs(bounded: np.ndarray, rms: np.ndarray, dense: np.ndarray) -> list[Run]:
    """Contiguous runs: bounded rows by density; unbounded rows by scale."""
    runs: list[Run] = []
    start, lo, hi = 0, 0.0, 0.0
    for i in range(len(bounded)):
        scale = max(float(rms[i]), 1e-30)
        if i == 0:
            start, lo, hi = 0, scale, scale
            continue
        same_kind = bool(bounded[i]) == bool(bounded[start])
        if bounded[i]:
            fits = bool(dense[i]) == bool(dense[start])
        else:
            fits = max(hi, scale) <= SCALE_RATIO * min(lo, scale)
        if same_kind and fits:
            lo, hi = min(lo, scale), max(hi, scale)
            continue
        runs.append((start, i, "score" if bounded[start] else "value", 1))
        start, lo, hi = i, scale, scale
    runs.append((start, len(bounded), "score" if bounded[start] else "value", 1))
    return runs


def _interleaved(runs: Sequence[Run], bounded: np.ndarray, rms: np.ndarray) -> list[Run] | None:
    """The runs up to the first score run, then the rows after it as strided groups, where those
    rows repeat one pattern to the end (keypoint triples); else None. A row's place in the
    pattern is "bounded", or for unbounded rows its decade of RMS (pixels vs logits).

    The tail starts after the first score run because detector outputs lead with box and class
    rows: a box's (w, h) followed by its score would otherwise read as one more triple."""
    first_score = next((i for i, r in enumerate(runs) if r[2] == "score"), None)
    if first_score is None or first_score + 1 >= len(runs):
        return None
    head: list[Run] = list(runs[: first_score + 1])
    start = runs[first_score][1]
    decade = np.floor(np.log10(np.maximum(rms[start:], 1e-30)))
    tail = np.where(bounded[start:], -np.inf, decade)
    for period in TAIL_PERIODS:
        if len(tail) % period or len(tail) < 2 * period:
            continue
        pattern = tail[:period]
        if len(set(pattern.tolist())) < 2 or not (tail.reshape(-1, period) == pattern).all():
            continue
        strided: list[Run] = []
        for offset in range(period):
            scales = rms[start + offset :: period]
            score = bool(bounded[start + offset])
            if not score and scales.max() > SCALE_RATIO * max(scales.min(), 1e-30):
                return None  # one position mixes scales: not one quantity per position
            kind: Kind = "score" if score else "value"
            first = start + offset
            last = first + (len(bounded) - 1 - first) // period * period
            strided.append((first, last + 1, kind, period))
        return head + strided
    return None


def _named(output: str, axis: int, runs: Sequence[Run]) -> list[OutputGroup]:
    """`value` / `score`, numbered (`value2`) when a kind occurs more than once."""
    counts = {kind: sum(r[2] == kind for r in runs) for kind in ("score", "value")}
    seen = {"score": 0, "value": 0}
    groups = []
    for start, stop, kind, step in runs:
        seen[kind] += 1
        name = kind if counts[kind] == 1 else f"{kind}{seen[kind]}"
        groups.append(OutputGroup(output, name, axis, start, stop, kind, step=step))
    return groups


def _bounded(array: np.ndarray) -> bool:
    values = np.asarray(array, dtype=np.float64)
    values = values[np.isfinite(values)]
    return bool(values.size) and values.min() >= -BOUND_TOLERANCE and (
        values.max() <= 1 + BOUND_TOLERANCE
    )


# ---------------------------------------------------------------- user syntax

_NAME = r"[A-Za-z_][A-Za-z0-9_.\-]*"
_GROUP = re.compile(rf"^(?P<name>{_NAME})=(?P<a>\d+)(?:-(?P<b>\d+))?(?:%(?P<step>[1-9]\d*))?"
                    r"(?:/(?P<kind>score|value))?$")
_AXIS = re.compile(r"^axis=(?P<axis>\d+)$")


def parse_groups(text: str | Iterable[str]) -> list[OutputGroup]:
    """`output0:box=0-3+cls=4-13` (rows inclusive) -> groups; see the module docstring.

    Several outputs: `,` between them (`a:x=0-1,b:y=0-3`) or a list of strings.
    """
    items = [text] if isinstance(text, str) else list(text)
    groups: list[OutputGroup] = []
    for item in items:
        for part in _split_outputs(item):
            groups.extend(_parse_output(part))
    labels = [g.label for g in groups]
    duplicate = next((lab for lab in labels if labels.count(lab) > 1), None)
    if duplicate:
        raise UsageError(f"--groups: group '{duplicate}' is given twice")
    return groups


def _split_outputs(text: str) -> list[str]:
    """One part per output (`,` between outputs; output names with `,` cannot be grouped)."""
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        raise UsageError("--groups: empty (expected OUTPUT:NAME=START-STOP+...)")
    return [p for p in parts if p]


def _parse_output(text: str) -> list[OutputGroup]:
    output, sep, rest = text.rpartition(":")
    if not sep or not output:
        raise UsageError(
            f"--groups {text!r}: expected OUTPUT:NAME=START-STOP+... "
            "(e.g. output0:box=0-3+cls=4-13)"
        )
    axis = 1
    specs: list[tuple[str, int, int, str | None, int]] = []
    for item in rest.split("+"):
        item = item.strip()
        if match := _AXIS.match(item):
            axis = int(match["axis"])
            continue
        match = _GROUP.match(item)
        if not match:
            raise UsageError(
                f"--groups {text!r}: {item!r} is not NAME=START-STOP "
                "(rows inclusive, optional %STEP and /score or /value)"
            )
        a = int(match["a"])
        b = int(match["b"]) if match["b"] is not None else a
        if b < a:
            raise UsageError(f"--groups {text!r}: {item!r} ends before it starts")
        specs.append((match["name"], a, b + 1, match["kind"], int(match["step"] or 1)))
    if not specs:
        raise UsageError(f"--groups {text!r}: no NAME=START-STOP group given")
    if axis < 1:
        raise UsageError(f"--groups {text!r}: axis 0 is the sample axis")
    owner: dict[int, str] = {}
    for name, a, b, _, step in specs:
        for row in range(a, b, step):
            if row in owner:
                raise UsageError(f"--groups {text!r}: groups '{owner[row]}' and '{name}' overlap")
            owner[row] = name
    return [
        OutputGroup(output, name, axis, a, b, kind or "value", kind_from_data=kind is None,
                    step=step)
        for name, a, b, kind, step in specs
    ]


def format_groups(groups: Sequence[OutputGroup]) -> str:
    """The `--groups` text for `groups` (whole-output groups left out: they are the default)."""
    by_output: dict[str, list[OutputGroup]] = {}
    for g in groups:
        if g.axis is not None:
            by_output.setdefault(g.output, []).append(g)
    parts = []
    for output, members in by_output.items():
        axis = "" if members[0].axis == 1 else f"axis={members[0].axis}+"
        body = "+".join(f"{g.name}={g.rows}/{g.kind}" for g in members)
        parts.append(f"{output}:{axis}{body}")
    return ",".join(parts)


def coerce_groups(groups: str | Sequence[str | OutputGroup] | None) -> list[OutputGroup]:
    """API and config forms (text, list of text, list of OutputGroup) -> groups."""
    if groups is None:
        return []
    if isinstance(groups, str):
        return parse_groups(groups)
    out: list[OutputGroup] = []
    for g in groups:
        out.extend([g] if isinstance(g, OutputGroup) else parse_groups(g))
    return out


def bind_groups(
    given: Sequence[OutputGroup], reference_outputs: Mapping[str, np.ndarray]
) -> list[OutputGroup]:
    """The groups a run measures: `given` checked against the outputs and completed.

    Unknown outputs and rows past the axis are usage errors. Kinds not given are read off the
    data; rows of a named output that no group covers, and outputs not named, get automatic
    groups, so nothing goes unmeasured.
    """
    known = set(reference_outputs)
    for g in given:
        if g.output not in known:
            raise UsageError(
                f"--groups: model has no output '{g.output}' (outputs: {', '.join(sorted(known))})"
            )
    out: list[OutputGroup] = []
    for name, array in reference_outputs.items():
        array = np.asarray(array)
        mine = sorted((g for g in given if g.output == name), key=lambda g: g.start)
        if not mine:
            out.extend(_output_groups(name, array))
            continue
        out.extend(_bind_output(name, array, mine))
    return out


def _bind_output(name: str, array: np.ndarray, mine: list[OutputGroup]) -> list[OutputGroup]:
    axes = {g.axis for g in mine}
    if len(axes) > 1:
        raise UsageError(f"--groups: output '{name}' has groups on different axes")
    axis = mine[0].axis
    if axis is None:  # a whole-output group (already bound): nothing to check or complete
        if len(mine) > 1:
            raise UsageError(f"--groups: output '{name}' has two whole-output groups")
        return mine
    if axis >= array.ndim:
        raise UsageError(f"--groups: output '{name}' {list(array.shape)} has no axis {axis}")
    size = array.shape[axis]
    for g in mine:
        if g.stop is None or g.stop > size:
            raise UsageError(
                f"--groups: {g.label} rows {g.rows} past output '{name}' axis {axis} "
                f"of size {size} (rows are 0-{size - 1})"
            )
    bounded, rms, dense = row_statistics(array, axis)
    bound = []
    for g in mine:
        if g.kind_from_data:
            kind: Kind = "score" if bool(np.all(bounded[g.start : g.stop : g.step])) else "value"
            g = replace(g, kind=kind, kind_from_data=False)
        bound.append(g)
    taken = {g.name for g in bound}
    covered = np.zeros(size, dtype=bool)
    for g in bound:
        covered[g.start : g.stop : g.step] = True
    rest = 0
    i = 0
    while i < size:
        if covered[i]:
            i += 1
            continue
        j = i
        while j < size and not covered[j]:
            j += 1
        runs = _auto_runs(bounded[i:j], rms[i:j], dense[i:j]) or [
            (0, j - i, "score" if bounded[i:j].all() else "value", 1)]
        for start, stop, kind, step in runs:
            rest += 1
            label = f"rest{rest}" if f"rest{rest}" not in taken else f"rest{rest}_"
            bound.append(OutputGroup(name, label, axis, i + start, i + stop, kind, step=step))
        i = j
    return sorted(bound, key=lambda g: g.start)
