"""onnxruntime sessions on IR models, and activation capture.

Capture exposes chosen intermediate values as extra graph outputs of a copy of the model and runs
it in batches, so a pass only ever holds one batch of the activations it asked for.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from rewriter.errors import OnexoneError

_IN_MEMORY_LIMIT = 1_500_000_000  # bytes of weights; above it the session loads from a temp file


def session_options(threads: int | None = None, optimize: bool = True) -> ort.SessionOptions:
    """CPU session options with threads set explicitly (benchmarks must say what they used)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def make_session(
    model: ir.Model, *, threads: int | None = None, optimize: bool = True
) -> ort.InferenceSession:
    """An onnxruntime CPU session for an in-memory IR model (big models go via a temp file)."""
    options = session_options(threads, optimize)
    weights = sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )
    try:
        if weights < _IN_MEMORY_LIMIT:
            data = ir.serde.serialize_model(model).SerializeToString()
            return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        with tempfile.TemporaryDirectory(prefix="onexone-session-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            ir.save(model, path, external_data="model.onnx.data")
            return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except OnexoneError:
        raise
    except Exception as exc:
        raise OnexoneError(f"onnxruntime cannot run the model: {' '.join(str(exc).split())[:300]}") from None


def input_names(model: ir.Model) -> list[str]:
    """Names of the inputs a caller must feed (initializers that double as inputs excluded)."""
    inits = set(model.graph.initializers)
    return [v.name for v in model.graph.inputs if v.name not in inits]


def with_outputs(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A copy of `model` that also returns the named values (main-graph values only)."""
    clone = model.clone()
    values = ir.convenience.create_value_mapping(clone.graph)
    present = {v.name for v in clone.graph.outputs}
    for name in names:
        if name in present:
            continue
        if name not in values:
            raise OnexoneError(f"cannot capture '{name}': no such value in the main graph")
        clone.graph.outputs.append(values[name])
        present.add(name)
    return clone


def iter_batches(inputs: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Slices of every input along the sample axis."""
    n = len(next(iter(inputs.values())))
    for start in range(0, n, batch_size):
        yield {k: v[start : start + batch_size] for k, v in inputs.items()}


def run_batched(
    session: ort.InferenceSession,
    inputs: Mapping[str, np.ndarray],
    output_names: Sequence[str] | None = None,
    batch_size: int = 32,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield {output name: array} per batch; only the session's declared inputs are fed."""
    feeds_wanted = {i.name for i in session.get_inputs()}
    names = list(output_names) if output_names else [o.name for o in session.get_outputs()]
    for batch in iter_batches(inputs, batch_size):
        feed = {k: v for k, v in batch.items() if k in feeds_wanted}
        yield dict(zip(names, session.run(names, feed)))


def capture(
    model: ir.Model,
    names: Sequence[str],
    inputs: Mapping[str, np.ndarray],
    batch_size: int = 32,
) -> Iterator[dict[str, np.ndarray]]:
    """Run `model` exposing the named intermediate values; yields one dict per batch."""
    session = make_session(with_outputs(model, names), optimize=False)
    yield from run_batched(session, inputs, names, batch_size)


def run_all(model: ir.Model, inputs: Mapping[str, np.ndarray], batch_size: int = 32) -> dict[str, np.ndarray]:
    """All graph outputs for all samples, concatenated (for fidelity on held-out data)."""
    session = make_session(model, optimize=True)
    parts: dict[str, list[np.ndarray]] = {}
    for out in run_batched(session, inputs, None, batch_size):
        for k, v in out.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v, axis=0) if v[0].ndim else v[-1] for k, v in parts.items()}
