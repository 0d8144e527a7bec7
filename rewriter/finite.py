"""Non-finite numbers, found once for every place they matter: data, weights, outputs.

NaN compares false with everything, so a check written `err > bound` passes NaN; every check
here is written so that NaN fails. Calibration data is refused before fitting when it holds
NaN, inf or values so large that float32 sums of squares overflow; tensors the tool creates must
be finite; outputs must be finite wherever the input model's are.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import onnx_ir as ir

#: |x| above this overflows float32 sums of squares over a million terms (sqrt(3.4e38 / 1e6)).
MAX_ABS = 1e16


def bad_samples(array: np.ndarray) -> np.ndarray:
    """Indices of samples (first axis) holding NaN, inf or |value| > MAX_ABS."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating) or array.size == 0:
        return np.zeros(0, dtype=np.int64)
    flat = array.reshape(len(array), -1) if array.ndim else array.reshape(1, 1)
    bad = np.zeros(len(flat), dtype=bool)
    for start in range(0, len(flat), 256):  # bounded temporaries on big sets
        chunk = flat[start:start + 256]
        # per-sample max and min (NaN propagates, so NaN fails both): no |x| temporary, 10x
        # faster than all(|x| <= MAX_ABS) on 100 images of 480x480
        with np.errstate(invalid="ignore"):
            bad[start:start + 256] = ~((chunk.max(axis=1) <= MAX_ABS)
                                       & (chunk.min(axis=1) >= -MAX_ABS))
    return np.flatnonzero(bad)


def within(value: float | None, bound: float) -> bool:
    """`value <= bound`, with NaN (and None: not measured) failing."""
    return value is not None and bool(value <= bound)


def nonfinite_count(array: np.ndarray) -> int:
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def new_nonfinite_tensors(model: ir.Model) -> list[tuple[str, int]]:
    """(name, count) of float tensors the tool created (not read from the input file) that
    hold NaN or inf. Tensors still as loaded are the user's (masks may hold -inf on purpose)."""
    found = []
    for name, tensor in _created_tensors(model):
        if not tensor.dtype.is_floating_point():
            continue
        count = nonfinite_count(tensor.numpy())
        if count:
            found.append((name, count))
    return found


def _created_tensors(model: ir.Model) -> Iterator[tuple[str, ir.TensorProtocol]]:
    loaded = (ir.TensorProtoTensor, ir.ExternalTensor)
    for graph in (*model.graphs(), *model.functions.values()):
        initializers = getattr(graph, "initializers", {})
        for value in initializers.values():
            tensor = value.const_value
            if tensor is not None and not isinstance(tensor, loaded):
                yield f"initializer '{value.name}'", tensor
        for node in graph:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR and not isinstance(attr.value, loaded):
                    yield f"node '{node.name}' ({node.op_type}) attribute '{attr.name}'", attr.value


def nonfinite_outputs(
    reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]
) -> list[tuple[str, int]]:
    """(output, count) where the candidate is NaN/inf at positions the reference is finite."""
    found = []
    for name, ref in reference.items():
        got = candidate.get(name)
        if got is None or not np.issubdtype(np.asarray(got).dtype, np.floating):
            continue
        ref, got = np.asarray(ref), np.asarray(got)
        if ref.shape != got.shape:
            continue
        ref_ok = np.isfinite(ref) if np.issubdtype(ref.dtype, np.floating) else True
        count = int(np.count_nonzero(ref_ok & ~np.isfinite(got)))
        if count:
            found.append((name, count))
    return found


def finite_part(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays at the positions where the reference is finite (compare only those)."""
    ref, got = np.asarray(reference), np.asarray(candidate)
    if not np.issubdtype(ref.dtype, np.floating) or ref.shape != got.shape:
        return ref, got
    mask = np.isfinite(ref)
    if mask.all():
        return ref, got
    return ref[mask], got[mask]
