"""Ranges for random integer inputs (`--calib random`): values a model could really be fed.

An integer input that indexes a table (Gather indices, e.g. token ids into an embedding) draws
from the table's rows; others draw from their dtype's small range (uint8 0..255, bool 0..1,
others 0..255), never just 0 and 1.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def integer_range(model: ir.Model | None, name: str, dtype: np.dtype) -> tuple[int, int]:
    """[low, high) for random values of the integer input `name`."""
    if dtype == np.bool_:
        return 0, 2
    if model is not None:
        high = _table_rows(model, name)
        if high:
            return 0, high
    if dtype == np.int8:
        return -128, 128
    return 0, 256


def _table_rows(model: ir.Model, name: str) -> int | None:
    """Rows of the smallest table this input indexes (Gather/GatherElements indices)."""
    value = next((v for v in model.graph.inputs if v.name == name), None)
    if value is None:
        return None
    rows = []
    for node, index in value.uses():
        if node.op_type not in ("Gather", "GatherElements") or index != 1:
            continue
        data = node.inputs[0]
        shape = data.shape if data is not None else None
        axis = int(node.attributes["axis"].value) if "axis" in node.attributes else 0
        if shape is not None and len(shape) > abs(axis) and isinstance(shape[axis], int):
            rows.append(shape[axis])
    return min(rows) if rows else None
