"""Bounds on every execution the tool starts on a user's model: time, memory, loop counts.

A tiny file can declare a Loop of 2^62 iterations or a 1 GiB input; running it would hang or
exhaust memory. Known costs are checked before running (constant loop trip counts, the bytes
the inputs and largest activations imply per sample); what cannot be known is bounded while it
runs (a wall-clock limit that sets onnxruntime's `RunOptions.terminate`). Each limit has an
environment variable that raises it, named in the error.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from rewriter.errors import ResourceLimitError

ENV_TIMEOUT = "ONEXONE_RUN_TIMEOUT"
ENV_MEMORY = "ONEXONE_MEMORY_LIMIT"
ENV_LOOPS = "ONEXONE_MAX_LOOP_ITERATIONS"

DEFAULT_TIMEOUT_S = 300.0  # one onnxruntime run (one batch)
DEFAULT_MEMORY_CAP = 4 * 2**30  # or half the machine's memory, whichever is less
DEFAULT_MAX_LOOP_ITERATIONS = 10**7


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    suffixes = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    scale = suffixes.get(text[-1].lower(), 1)
    try:
        value = float(text[:-1] if scale != 1 else text) * scale
    except ValueError:
        raise ResourceLimitError(f"{name}={text!r} is not a number") from None
    if not value >= 0:  # NaN fails too
        raise ResourceLimitError(f"{name}={text!r} must be >= 0")
    return value


def run_timeout_s() -> float | None:
    """Seconds one run may take (None: no limit, `ONEXONE_RUN_TIMEOUT=0`)."""
    value = _env_number(ENV_TIMEOUT, DEFAULT_TIMEOUT_S)
    return value or None


def memory_limit() -> int:
    """Bytes one execution may need (inputs, outputs and working activations)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        physical = 2 * DEFAULT_MEMORY_CAP
    return int(_env_number(ENV_MEMORY, min(DEFAULT_MEMORY_CAP, physical // 2)))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_memory(nbytes: int, what: str) -> None:
    """Refuse work whose estimated memory is over the limit, before allocating any of it."""
    limit = memory_limit()
    if nbytes > limit:
        raise ResourceLimitError(
            f"{what} needs about {_gib(nbytes)}, over the {_gib(limit)} memory limit "
            f"(set {ENV_MEMORY}=BYTES, e.g. 16G, to raise it)"
        )


# ------------------------------------------------------------------------------ estimates


def _per_sample_bytes(value: ir.Value) -> int | None:
    """Bytes of one sample of `value` (a symbolic leading dim counts as 1), None if unknown."""
    if value.shape is None or value.dtype is None:
        return None
    dims = list(value.shape)
    if dims and not isinstance(dims[0], int):
        dims[0] = 1
    if not all(isinstance(d, int) and d >= 0 for d in dims):
        return None
    try:
        itemsize = value.dtype.itemsize
    except Exception:  # strings and other types without a fixed width
        return None
    return math.ceil(int(np.prod(dims, dtype=object)) * itemsize)


def sample_bytes(model: ir.Model) -> int:
    """Memory one sample needs in a run: its inputs, outputs and twice the largest activation
    (an op reads one while writing another). Unknown shapes count as nothing."""
    graph = model.graph
    inits = set(graph.initializers)
    feeds = [v for v in graph.inputs if v.name not in inits]
    total = sum(_per_sample_bytes(v) or 0 for v in (*feeds, *graph.outputs))
    largest = max((_per_sample_bytes(v) or 0 for node in graph for v in node.outputs), default=0)
    return total + 2 * largest


def batch_that_fits(per_sample: int, wanted: int, what: str) -> int:
    """The largest batch up to `wanted` whose estimate fits the memory limit (at least 1)."""
    check_memory(per_sample, f"{what}: one sample")
    limit = memory_limit()
    return max(1, min(wanted, limit // max(per_sample, 1)))


def feed_bytes(shapes: Mapping[str, Sequence[int]], dtypes: Mapping[str, np.dtype]) -> int:
    return sum(int(np.prod(list(s), dtype=object)) * np.dtype(dtypes[k]).itemsize
               for k, s in shapes.items())


# ------------------------------------------------------------------------------ loops


def check_loops(model: ir.Model) -> None:
    """Refuse models whose constant Loop trip counts (nested ones multiplied) exceed the limit."""
    limit = _env_number(ENV_LOOPS, DEFAULT_MAX_LOOP_ITERATIONS)
    for node, iterations in _loop_iterations(model.graph, 1):
        if iterations > limit:
            raise ResourceLimitError(
                f"node '{node.name}' (Loop) runs up to {iterations:.3g} iterations, over the "
                f"limit of {limit:.3g} (set {ENV_LOOPS}=N to raise it)"
            )


def _loop_iterations(graph: ir.Graph, outer: int) -> Iterator[tuple[ir.Node, int]]:
    for node in graph:
        count = outer
        if node.op_type == "Loop" and node.domain in ("", "ai.onnx"):
            trips = _constant_int(node.inputs[0] if node.inputs else None)
            if trips is not None:
                count = outer * max(trips, 0)
                yield node, count
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from _loop_iterations(attr.value, count)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.value:
                    yield from _loop_iterations(sub, count)


def _constant_int(value: ir.Value | None) -> int | None:
    from rewriter.graph import const_tensor

    tensor = const_tensor(value) if value is not None and not value.is_graph_input() else None
    if tensor is None or tensor.size != 1:
        return None
    return int(np.asarray(tensor.numpy()).reshape(-1)[0])


# ------------------------------------------------------------------------------ time


def timed_run(session, names, feed, options) -> list:
    """`session.run` that onnxruntime stops (`RunOptions.terminate`) after the time limit or
    when this thread is interrupted (Ctrl-C, SIGTERM).

    The run happens in a worker thread (onnxruntime releases the GIL) while this one waits in
    short slices, so signal handlers get to run during a long run instead of after it.
    """
    import time

    limit = run_timeout_s()
    deadline = None if limit is None else time.monotonic() + limit
    box: dict[str, object] = {}
    done = threading.Event()  # not Thread.join: an interrupted join can report a live thread dead

    def work() -> None:
        try:
            box["result"] = session.run(names, feed, options)
        except BaseException as exc:  # handed to the waiting thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=work, name="onexone-run", daemon=True).start()
    expired = False
    try:
        while not done.wait(0.05):
            if deadline is not None and not expired and time.monotonic() > deadline:
                expired = True
                options.terminate = True
    except BaseException:  # KeyboardInterrupt (SIGINT, or SIGTERM via the CLI): stop the run
        options.terminate = True
        _wait_uninterrupted(done)  # the run must end before the interpreter does
        raise
    if "error" in box:
        if expired:
            raise ResourceLimitError(
                f"onnxruntime run of the model did not finish within {limit:g} s "
                f"(set {ENV_TIMEOUT}=SECONDS to raise it, 0 for no limit)"
            ) from None
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def _wait_uninterrupted(done: threading.Event) -> None:
    while True:
        try:
            if done.wait(0.05):
                return
        except KeyboardInterrupt:  # a second Ctrl-C: still wait for onnxruntime to stop
            continue
