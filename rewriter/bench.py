"""Latency A/B in onnxruntime: is the rewritten model faster on this machine, and by how much?

Both models get CPU sessions with graph optimisation ALL and the same explicit thread count.
After a warm-up, runs are interleaved in pairs (A then B, next pair B then A) so drift in clock
speed, caches or neighbours' load hits both models alike; the speedup is computed per pair and
reported as a median with its spread (p10-p90), not as a ratio of two unrelated medians.
Thread pools do not spin between runs, so one session's idle workers never steal the other's cores.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from rewriter.calibration import CalibrationSet, InputSpec, model_input_specs
from rewriter.errors import CalibrationError
from rewriter.progress import track
from rewriter.runtime import make_session

#: Pairs measured when `repeats` is not given: enough for a stable median, bounded for big models.
MIN_REPEATS, MAX_REPEATS = 15, 400
#: Measuring time aimed for per batch size when `repeats` is not given.
DEFAULT_MIN_TIME_S = 1.0
DEFAULT_WARMUP = 3
NO_SPINNING = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}

ModelLike = ir.Model | onnx.ModelProto | str | os.PathLike


def stats_ms(samples_s: Sequence[float]) -> dict[str, float]:
    """Median, p90, p10, mean and min of run times given in seconds, in milliseconds."""
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    return {
        "median": round(float(np.median(ms)), 4),
        "p90": round(float(np.percentile(ms, 90)), 4),
        "p10": round(float(np.percentile(ms, 10)), 4),
        "mean": round(float(np.mean(ms)), 4),
        "min": round(float(np.min(ms)), 4),
    }


def ab_latency(
    session_a: ort.InferenceSession,
    session_b: ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    *,
    repeats: int | None = None,
    warmup: int = DEFAULT_WARMUP,
    min_time_s: float = DEFAULT_MIN_TIME_S,
    label: str = "benchmark",
) -> dict[str, Any]:
    """Interleaved A/B timing of two sessions on the same feeds.

    Returns `a_ms` and `b_ms` (median, p90, ...), `speedup` = a/b per pair (median, p10, p90)
    and the number of pairs. Without `repeats`, as many pairs as fit in `min_time_s` (bounded).
    """
    feed_a = _feed_for(session_a, feeds)
    feed_b = _feed_for(session_b, feeds)
    from rewriter.runtime import run_session

    for _ in range(max(warmup, 1)):  # at least one: the first run allocates; bounded in time
        run_session(session_a, None, feed_a)
        run_session(session_b, None, feed_b)
    if repeats is None:
        pair = _time(session_a, feed_a) + _time(session_b, feed_b)
        repeats = int(min(MAX_REPEATS, max(MIN_REPEATS, math.ceil(min_time_s / max(pair, 1e-6)))))
    times_a, times_b = [], []
    for i in track(range(repeats), label):
        if i % 2 == 0:
            times_a.append(_time(session_a, feed_a))
            times_b.append(_time(session_b, feed_b))
        else:
            times_b.append(_time(session_b, feed_b))
            times_a.append(_time(session_a, feed_a))
    ratios = np.asarray(times_a) / np.maximum(np.asarray(times_b), 1e-12)
    return {
        "a_ms": stats_ms(times_a),
        "b_ms": stats_ms(times_b),
        "speedup": {
            "median": round(float(np.median(ratios)), 4),
            "p10": round(float(np.percentile(ratios, 10)), 4),
            "p90": round(float(np.percentile(ratios, 90)), 4),
        },
        "repeats": repeats,
        "warmup": warmup,
    }


def benchmark_models(
    original: ModelLike,
    rewritten: ModelLike,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    threads: int = 1,
    batches: Sequence[int] = (1,),
    data: CalibrationSet | Mapping[str, np.ndarray] | None = None,
    repeats: int | None = None,
    warmup: int = DEFAULT_WARMUP,
    min_time_s: float = DEFAULT_MIN_TIME_S,
    seed: int = 0,
) -> dict[str, Any]:
    """Latency of `original` vs `rewritten` per batch size (report's `latency` section).

    Inputs come from `data` (real samples, repeated to fill a batch) or are seeded random with
    dynamic dims taken from `input_shapes`. A model whose batch dim is fixed runs at that size
    (the entry says so). The top-level fields describe the first batch size; `batches` lists all.
    """
    original, rewritten = _as_ir(original), _as_ir(rewritten)
    threads = int(threads or 1)
    sessions = [make_session(m, threads=threads, config=NO_SPINNING) for m in (original, rewritten)]
    specs = model_input_specs(original)
    entries: list[dict[str, Any]] = []
    notes: list[str] = []
    for batch in dict.fromkeys(int(b) for b in (batches or [1])):
        feeds, effective = batch_feeds(specs, batch, input_shapes or {}, data, seed)
        if effective != batch:
            notes.append(f"model fixes batch {effective}; batch {batch} ran as {effective}")
        if any(e["batch"] == effective for e in entries):
            continue
        ab = ab_latency(*sessions, feeds, repeats=repeats, warmup=warmup, min_time_s=min_time_s,
                        label=f"benchmark batch {effective}")
        entries.append({
            "batch": effective,
            "original_ms": ab["a_ms"],
            "rewritten_ms": ab["b_ms"],
            "speedup": ab["speedup"],
            "repeats": ab["repeats"],
        })
    first = entries[0]
    result: dict[str, Any] = {
        **{k: first[k] for k in ("original_ms", "rewritten_ms", "speedup", "batch", "repeats")},
        "threads": threads,
        "warmup": warmup,
        "inputs": "calibration samples" if data is not None else "random",
        "provider": "CPUExecutionProvider",
        "graph_optimization": "ALL",
        "method": "interleaved A/B pairs (order alternates), speedup per pair",
    }
    if notes:
        result["notes"] = notes
    if len(entries) > 1:
        result["batches"] = entries
    return result


def batch_feeds(
    specs: Sequence[InputSpec],
    batch: int,
    input_shapes: Mapping[str, Sequence[int]],
    data: CalibrationSet | Mapping[str, np.ndarray] | None,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], int]:
    """One batch of inputs and the batch size actually used (a fixed batch dim wins)."""
    arrays = data.inputs if isinstance(data, CalibrationSet) else (data or {})
    fixed = [s.shape[0] for s in specs if s.shape and s.shape[0] is not None]
    size = fixed[0] if fixed else batch
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in specs:
        if s.name in arrays and len(arrays[s.name]):
            samples = np.asarray(arrays[s.name])
            feeds[s.name] = np.ascontiguousarray(samples[np.arange(size) % len(samples)])
            continue
        dims = list(input_shapes.get(s.name) or s.shape)
        if dims:
            dims[0] = size
        if any(d is None for d in dims):
            raise CalibrationError(
                f"benchmark: input '{s.name}' has dynamic dims "
                f"{['?' if d is None else d for d in s.shape]}; give --input-shape {s.name}:... "
                "or --calib data"
            )
        if np.issubdtype(s.dtype, np.floating):
            feeds[s.name] = rng.standard_normal(dims).astype(s.dtype)
        else:
            feeds[s.name] = rng.integers(0, 2, dims).astype(s.dtype)
    return feeds, size


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """What a latency number depends on: CPU model, cores, threads used, library versions."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_available": (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        ),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }
    if threads is not None:
        info["threads"] = threads
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _as_ir(model: ModelLike) -> ir.Model:
    if isinstance(model, ir.Model):
        return model
    from rewriter.io import load

    return load(model)


def _feed_for(
    session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    wanted = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feeds.items() if k in wanted}


def _time(session: ort.InferenceSession, feed: Mapping[str, np.ndarray]) -> float:
    start = time.perf_counter()
    session.run(None, feed)
    return time.perf_counter() - start
