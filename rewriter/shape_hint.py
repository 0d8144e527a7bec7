"""What to tell a user whose model has dynamic input dims: its inputs, and what to type."""

from __future__ import annotations

import onnx_ir as ir

from rewriter.calibration import model_input_specs


def _dims(value: ir.Value) -> list[str]:
    return [str(d) if isinstance(d, int) else str(d.value or "?") for d in (value.shape or [])]


def model_inputs(model: ir.Model) -> list[dict]:
    """Name, dtype and shape (symbolic dims by name) of each input a caller feeds."""
    inits = set(model.graph.initializers)
    out = []
    for value in model.graph.inputs:
        if value.name in inits:
            continue
        dtype = value.dtype.name.lower() if value.dtype is not None else "?"
        out.append({"name": value.name, "dtype": dtype, "shape": _dims(value)})
    return out


def dynamic_inputs(model: ir.Model) -> list[str]:
    """Inputs with a symbolic dim beyond the batch axis (their MACs need a size)."""
    return [s.name for s in model_input_specs(model) if any(d is None for d in s.shape[1:])]


def input_shape_flags(model: ir.Model) -> str:
    """`--input-shape x:1,3,H,W` for each dynamic input (batch 1; fill in the named dims)."""
    flags = []
    for entry in model_inputs(model):
        if entry["name"] not in dynamic_inputs(model):
            continue
        dims = ["1" if i == 0 and not d.isdigit() else d for i, d in enumerate(entry["shape"])]
        flags.append(f"--input-shape {entry['name']}:{','.join(dims)}")
    return " ".join(flags)


def shapes_needed(model: ir.Model, unknown: int, what: str) -> str:
    """One line: why `what` cannot be computed, and the exact flags to add."""
    flags = input_shape_flags(model)
    named = sorted({d for e in model_inputs(model) for d in e["shape"][1:] if not d.isdigit()})
    fill = f", with your sizes for {', '.join(named)}" if named else ""
    return (
        f"{what}: shapes of {unknown} nodes depend on dynamic input dims "
        f"({', '.join(dynamic_inputs(model)) or 'inputs'}); add {flags}{fill} "
        "(or --calib data of the real size)"
    )
