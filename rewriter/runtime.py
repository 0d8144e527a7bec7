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
from rewriter.graph import remove_unused

_IN_MEMORY_LIMIT = 1_500_000_000  # bytes of weights; above it the session loads from a temp file

#: onnxruntime sessions opened by this process (what a run costs; read by benchmarks and tests).
SESSIONS_OPENED = 0


def session_options(threads: int | None = None, optimize: bool = True) -> ort.SessionOptions:
    """CPU session options with threads set explicitly (benchmarks must say what they used)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures reach the user as our one line, not ORT's log
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def make_session(
    model: ir.Model,
    *,
    threads: int | None = None,
    optimize: bool = True,
    config: Mapping[str, str] | None = None,
) -> ort.InferenceSession:
    """An onnxruntime CPU session for an in-memory IR model (big models go via a temp file).

    `config` adds session config entries (e.g. `session.intra_op.allow_spinning`).
    """
    global SESSIONS_OPENED
    SESSIONS_OPENED += 1
    from rewriter.limits import check_loops, sample_bytes

    check_loops(model)  # a constant trip count of 2^62 is refused before it can hang a run
    options = session_options(threads, optimize)
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    weights = sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )
    try:
        if weights < _IN_MEMORY_LIMIT and not _has_external_data(model):
            data = ir.serde.serialize_model(model).SerializeToString()
            session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        else:
            with tempfile.TemporaryDirectory(prefix="onexone-session-") as tmp:
                path = os.path.join(tmp, "model.onnx")
                ir.save(model, path, external_data="model.onnx.data")
                session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        session.onexone_sample_bytes = sample_bytes(model)  # read by run_batched
        return session
    except OnexoneError:
        raise
    except Exception as exc:
        raise OnexoneError(f"onnxruntime cannot run the model: {_one_line(exc)}") from None


def _has_external_data(model: ir.Model) -> bool:
    """True when a tensor still points at an external file (serialized bytes would make
    onnxruntime resolve it against the working directory, not the model's folder)."""
    for graph in model.graphs():
        if any(isinstance(v.const_value, ir.ExternalTensor) for v in graph.initializers.values()):
            return True
        for node in graph:
            for attr in node.attributes.values():
                tensor = attr.value if attr.type == ir.AttributeType.TENSOR else None
                if isinstance(tensor, ir.ExternalTensor):
                    return True
    return False


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


def only_outputs(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A copy of `model` that computes just the named values: onnxruntime runs every node of a
    graph whatever is fetched, so the nodes they do not depend on are removed (a capture of an
    early layer's input then costs a few nodes, not the model)."""
    clone = with_outputs(model, names)
    wanted = [v for v in clone.graph.outputs if v.name in set(names)]
    clone.graph.outputs.clear()
    clone.graph.outputs.extend(wanted)
    remove_unused(clone)
    return clone


def iter_batches(
    inputs: Mapping[str, np.ndarray], batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Slices of every input along the sample axis."""
    n = len(next(iter(inputs.values())))
    for start in range(0, n, batch_size):
        yield {k: v[start : start + batch_size] for k, v in inputs.items()}


def fixed_batch(session: ort.InferenceSession) -> int | None:
    """The batch size the model's inputs fix (a static leading dim), or None when it is free."""
    for meta in session.get_inputs():
        if meta.shape and isinstance(meta.shape[0], int) and meta.shape[0] > 0:
            return meta.shape[0]
    return None


def run_batched(
    session: ort.InferenceSession,
    inputs: Mapping[str, np.ndarray],
    output_names: Sequence[str] | None = None,
    batch_size: int = 32,
    label: str | None = None,
    constants: Mapping[str, np.ndarray] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield {output name: array} per batch; only the session's declared inputs are fed, and
    `constants` (weights a shared session takes as inputs) whole with every batch.

    A model exported with a fixed batch (often 1) still takes a calibration set of any size: it
    runs in batches of its own size, the last one padded by repeating samples and trimmed after.
    `label` shows a progress bar when the CLI enabled them (see `rewriter.progress`).
    """
    from rewriter.progress import track

    feeds_wanted = {i.name for i in session.get_inputs()}
    names = list(output_names) if output_names else [o.name for o in session.get_outputs()]
    from rewriter.limits import batch_that_fits

    fixed = fixed_batch(session)
    per_sample = getattr(session, "onexone_sample_bytes", 0)
    size = fixed or batch_that_fits(per_sample, batch_size, "running the model")
    if fixed:
        batch_that_fits(per_sample * fixed, 1, f"running the model at its fixed batch {fixed}")
    n = len(next(iter(inputs.values()))) if inputs else 0
    batches = iter_batches(inputs, size)
    if label:
        batches = track(batches, label, total=-(-n // size))
    for batch in batches:
        feed = {k: v for k, v in batch.items() if k in feeds_wanted}
        real = len(next(iter(feed.values()))) if feed else size
        if fixed and real < fixed:
            pad = fixed - real
            feed = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in feed.items()}
        feed.update(constants or {})
        out = dict(zip(names, run_session(session, names, feed), strict=True))
        if fixed and real < fixed:
            out = {k: v[:real] if v.ndim and v.shape[0] == fixed else v for k, v in out.items()}
        yield out


def run_session(
    session: ort.InferenceSession, names: Sequence[str] | None, feed: Mapping[str, np.ndarray]
) -> list:
    """One `session.run`, with onnxruntime's own failures turned into one-line errors."""
    options = ort.RunOptions()
    options.log_severity_level = 4  # failures come back as one line, not onnxruntime's log
    from rewriter.limits import timed_run

    try:
        return timed_run(session, list(names) if names else None, dict(feed), options)
    except OnexoneError:
        raise
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidArgument / ...
        raise OnexoneError(f"onnxruntime cannot run the model: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def capture(
    model: ir.Model,
    names: Sequence[str],
    inputs: Mapping[str, np.ndarray],
    batch_size: int = 32,
    label: str | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Run `model` exposing the named intermediate values; yields one dict per batch."""
    from rewriter.errors import CalibrationError
    from rewriter.finite import nonfinite_count

    session = make_session(only_outputs(model, names), optimize=False)
    for batch in run_batched(session, inputs, names, batch_size, label):
        for name, array in batch.items():
            count = nonfinite_count(array) if isinstance(array, np.ndarray) else 0
            if count:  # a fit on these would return NaN weights or fail in linear algebra
                _raise_if_nonfinite_weights(model, name)
                raise CalibrationError(
                    f"activation '{name}' has {count} NaN/inf values on the calibration data "
                    "(the model overflows on it); fix the data or exclude that layer"
                )
        yield batch


def _raise_if_nonfinite_weights(model: ir.Model, activation: str) -> None:
    """NaN activations from NaN weights an earlier fit wrote: say that, not "bad data"."""
    from rewriter.errors import InternalCheckError
    from rewriter.finite import new_nonfinite_tensors

    bad = new_nonfinite_tensors(model)
    if bad:
        raise InternalCheckError(
            f"activation '{activation}' is NaN/inf because a fit wrote {bad[0][1]} NaN/inf values "
            f"into {bad[0][0]} (check the pass options, e.g. ridge); nothing written"
        )


def run_all(
    model: ir.Model, inputs: Mapping[str, np.ndarray], batch_size: int = 32
) -> dict[str, np.ndarray]:
    """All graph outputs for all samples, concatenated (for fidelity on held-out data)."""
    return run_session_all(make_session(model, optimize=True), inputs, batch_size)


def run_file(
    path: str | os.PathLike, inputs: Mapping[str, np.ndarray], batch_size: int = 32
) -> dict[str, np.ndarray]:
    """`run_all` for a model file made by another tool (onnxruntime's quantizer, a user's)."""
    session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    return run_session_all(session, inputs, batch_size)


def run_session_all(
    session: ort.InferenceSession, inputs: Mapping[str, np.ndarray], batch_size: int = 32,
    constants: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """All outputs of `session` for all samples, run in batches and concatenated."""
    parts: dict[str, list[np.ndarray]] = {}
    for out in run_batched(session, inputs, None, batch_size, constants=constants):
        for k, v in out.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v, axis=0) if v[0].ndim else v[-1] for k, v in parts.items()}
