"""Checks shared by the safety tests: seeded feeds, full validation, and proto-level equality.

"Never damage a model" is asserted the same way everywhere: the written file passes the full
onnx.checker, runs in onnxruntime, and (for a plain round trip) gives bit-identical outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from tests.conftest import ort_run

#: Size used for a dynamic dim when building feeds (per input position: batch, C, H, W, ...).
DEFAULT_DYNAMIC_DIMS = {0: 1, 1: 3, 2: 48, 3: 64}


def seeded_feeds(
    proto: onnx.ModelProto, seed: int = 0, overrides: dict[str, tuple[int, ...]] | None = None
) -> dict[str, np.ndarray]:
    """Random inputs matching the graph's declared inputs (dynamic dims get small sizes)."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in proto.graph.initializer}
    feeds = {}
    for value in proto.graph.input:
        if value.name in inits:
            continue
        tensor_type = value.type.tensor_type
        if overrides and value.name in overrides:
            shape = overrides[value.name]
        else:
            shape = tuple(
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                else DEFAULT_DYNAMIC_DIMS.get(i, 8)
                for i, d in enumerate(tensor_type.shape.dim)
            )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[value.name] = rng.integers(0, 3, shape).astype(dtype)
    return feeds


def assert_valid(path: Path, feeds: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """Full onnx.checker on the file, then an onnxruntime run (seeded feeds unless given)."""
    onnx.checker.check_model(str(path), full_check=True)
    if feeds is None:
        feeds = seeded_feeds(onnx.load(str(path), load_external_data=False))
    return ort_run(Path(path), feeds)


def assert_bit_identical(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), "outputs differ after a round trip"


def tensors_by_name(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node tensors (PP-OCR keeps its weights in Constant nodes)."""
    found = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    found[f"{node.output[0]}@{attr.name}"] = numpy_helper.to_array(attr.t)
    return found


def assert_same_structure(original: onnx.ModelProto, written: onnx.ModelProto) -> None:
    """Initializers, opset imports, node names and metadata_props unchanged."""
    before, after = tensors_by_name(original), tensors_by_name(written)
    assert before.keys() == after.keys()
    for name, array in before.items():
        assert array.dtype == after[name].dtype and array.shape == after[name].shape, name
        assert array.tobytes() == after[name].tobytes(), f"tensor {name} changed"
    assert {(o.domain or "", o.version) for o in original.opset_import} == {
        (o.domain or "", o.version) for o in written.opset_import
    }
    assert [n.name for n in original.graph.node] == [n.name for n in written.graph.node]
    assert {p.key: p.value for p in original.metadata_props} == {
        p.key: p.value for p in written.metadata_props
    }
