"""Shape helpers written once: inference on the IR, static-shape reads, fixing dynamic inputs.

Inference runs onnx's C++ shape inference on a weightless copy of the graph structure (large
initializers become typed inputs), so it works for models past the 2 GB protobuf limit and never
copies the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import onnx
import onnx_ir as ir

from rewriter.errors import UsageError

_SMALL_TENSOR_BYTES = 1024  # shape-like constants stay in so data propagation can read them


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The value's shape as ints, or None when unknown or partly symbolic."""
    if value is None or value.shape is None:
        return None
    dims = []
    for dim in value.shape:
        if not isinstance(dim, int) or dim < 0:
            return None
        dims.append(dim)
    return tuple(dims)


def infer_shapes(model: ir.Model, *, strict: bool = True, keep_outputs: bool = True) -> str | None:
    """Re-infer every intermediate shape in place (stale ones cleared first).

    Graph inputs and outputs keep their declared shapes, so dynamic dims stay symbolic
    (`keep_outputs=False` re-infers outputs too: for analysis copies with fixed inputs).
    Returns None on success or the inference error message (the model keeps no stale shapes).
    """
    for graph in model.graphs():
        interface = set(graph.inputs) | set(graph.initializers.values())
        if keep_outputs:
            interface |= set(graph.outputs)
        for node in graph:
            for value in node.outputs:
                if value not in interface:
                    value.shape = None
    with _weightless(model):
        proto = ir.serde.serialize_model(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(
            proto, check_type=True, strict_mode=strict, data_prop=True
        )
    except Exception as exc:
        return " ".join(str(exc).split())[:400] or type(exc).__name__
    _merge_inferred(model, ir.serde.deserialize_model(inferred))
    return None


@contextlib.contextmanager
def _weightless(model: ir.Model) -> Iterator[None]:
    """Temporarily turn large initializers into typed graph inputs (restored on exit)."""
    graph = model.graph
    moved: list[tuple[ir.Value, ir.TensorProtocol]] = []
    n_inputs = len(graph.inputs)
    order = list(graph.initializers.values())
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if tensor is None or tensor.nbytes <= _SMALL_TENSOR_BYTES:
            continue
        if value.shape is None:
            value.shape = tensor.shape
        if value.dtype is None:
            value.dtype = tensor.dtype
        moved.append((value, tensor))
        graph.initializers.pop(value.name)
        value.const_value = None
        if value not in graph.inputs:
            graph.inputs.append(value)
    try:
        yield
    finally:
        while len(graph.inputs) > n_inputs:  # pop() clears is_graph_input; del would not
            graph.inputs.pop()
        for value, tensor in moved:
            value.const_value = tensor
        if moved:  # re-register every initializer in its original order (saved files stay put)
            for value in order:
                graph.initializers.pop(value.name, None)
            for value in order:
                graph.register_initializer(value)


def _merge_inferred(model: ir.Model, inferred: ir.Model) -> None:
    for graph, inferred_graph in zip(model.graphs(), inferred.graphs(), strict=True):
        found = ir.convenience.create_value_mapping(inferred_graph)
        for name, value in ir.convenience.create_value_mapping(graph).items():
            new = found.get(name)
            if new is None:
                continue
            if new.shape is not None and (
                value.shape is None or (_is_static(new.shape) and not _is_static(value.shape))
            ):
                value.shape = new.shape
            if new.dtype is not None and value.dtype is None:
                value.dtype = new.dtype


def _is_static(shape: ir.Shape | Sequence) -> bool:
    return all(isinstance(d, int) and d >= 0 for d in shape)


def _check_fits(value: ir.Value, dims: Sequence[int]) -> None:
    """A fixed shape must keep the input's rank and its static dims (else analysis is junk)."""
    if value.shape is None:
        return
    declared = list(value.shape)
    if len(declared) != len(dims):
        raise UsageError(f"--input-shape {value.name}: {len(dims)} dims given, the input has "
                         f"{len(declared)} ({[str(d) for d in declared]})")
    for axis, (have, want) in enumerate(zip(declared, dims, strict=True)):
        if isinstance(have, int) and have >= 0 and have != want:
            raise UsageError(f"--input-shape {value.name}: dim {axis} is fixed to {have} in the "
                             f"model, not {want}")


def parse_input_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """`name:1,3,224,224` strings (CLI --input-shape) to a dict."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        if not sep or not name:
            raise ValueError(f"--input-shape {spec!r}: expected NAME:D1,D2,...")
        try:
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise ValueError(f"--input-shape {spec!r}: dims must be integers") from None
    return shapes


def with_input_shapes(model: ir.Model, shapes: Mapping[str, Sequence[int]]) -> ir.Model:
    """A copy of the model with input dims fixed, for analysis and benchmarks only.

    Symbolic dims not named in `shapes` stay symbolic, except a leading batch dim which becomes 1
    (costs are reported per sample). The original model is never frozen.
    """
    clone = model.clone()
    by_name = {v.name: v for v in clone.graph.inputs}
    unknown = set(shapes) - set(by_name)
    if unknown:
        raise UsageError(f"--input-shape names unknown inputs {sorted(unknown)}; "
                         f"model inputs are {sorted(by_name)}")
    initializers = set(clone.graph.initializers)
    for value in clone.graph.inputs:
        if value.name in initializers:
            continue
        if value.name in shapes:
            _check_fits(value, shapes[value.name])
            value.shape = ir.Shape(list(shapes[value.name]))
        elif value.shape is not None and len(value.shape) > 0 and not _is_static(value.shape[:1]):
            value.shape = ir.Shape([1, *value.shape[1:]])
    infer_shapes(clone, strict=False, keep_outputs=False)
    _shapes_by_running(clone)
    return clone


def _shapes_by_running(model: ir.Model) -> None:
    """Fill shapes static inference left unknown by running the fixed-shape copy once.

    onnx's data propagation gives up on shape arithmetic such as Shape→Gather→Concat→Reshape
    (PP-OCR's SVTR neck); with every input static, one onnxruntime run on zeros tells the real
    sizes. Analysis copies only; skipped quietly when an input is still dynamic or the model
    cannot run (custom ops).
    """
    graph = model.graph
    missing = [
        v for node in graph for v in node.outputs
        if v.name and (v.shape is None or not _is_static(v.shape)) and not v.is_graph_output()
    ]
    missing += [v for v in graph.outputs if v.shape is None or not _is_static(v.shape)]
    feeds_spec = [v for v in graph.inputs if v.name not in graph.initializers]
    if not missing or not all(v.shape is not None and _is_static(v.shape) for v in feeds_spec):
        return
    import numpy as np

    from rewriter import runtime  # local: runtime imports onnxruntime
    from rewriter.errors import ResourceLimitError
    from rewriter.limits import check_memory, sample_bytes

    try:
        names = list(dict.fromkeys(v.name for v in missing))
        check_memory(sample_bytes(model), "probing shapes with one run of the model")
        session = runtime.make_session(runtime.with_outputs(model, names), optimize=False)
        feeds = {v.name: np.zeros(tuple(v.shape), v.dtype.numpy()) for v in feeds_spec}
        results = runtime.run_session(session, names, feeds)
    except ResourceLimitError:  # a model too big or too slow to probe is too big to rewrite
        raise
    except Exception:  # analysis stays as good as static inference made it
        return
    by_name = {v.name: v for v in missing}
    for name, array in zip(names, results, strict=True):
        if isinstance(array, np.ndarray):
            by_name[name].shape = ir.Shape(list(array.shape))
