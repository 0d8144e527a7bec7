"""What to tell a user whose model has dynamic input dims: its inputs, and what to type."""

from __future__ import annotations

import re

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


def _placeholder(dim: str, axis: int, rank: int) -> str:
    """A dim to fill in, by a short readable name (`H`, `W` for an image's last two axes)."""
    if dim.isdigit():
        return dim
    if axis == 0:
        return "1"
    if rank == 4 and axis >= 2:
        return "HW"[axis - 2]
    return dim if re.fullmatch(r"[A-Za-z_]\w{0,11}", dim) else f"D{axis}"


def _placeholders(model: ir.Model) -> dict[str, list[str]]:
    dynamic = set(dynamic_inputs(model))
    return {
        e["name"]: [_placeholder(d, i, len(e["shape"])) for i, d in enumerate(e["shape"])]
        for e in model_inputs(model)
        if e["name"] in dynamic
    }


def input_shape_flags(model: ir.Model) -> str:
    """`--input-shape x:1,3,H,W` for each dynamic input (batch 1; fill in the named dims)."""
    return " ".join(
        f"--input-shape {name}:{','.join(dims)}" for name, dims in _placeholders(model).items()
    )


def shapes_needed(model: ir.Model, unknown: int, what: str) -> str:
    """One line: why `what` cannot be computed, and the exact flags to add."""
    flags = input_shape_flags(model)
    named = sorted(
        {d for dims in _placeholders(model).values() for d in dims[1:] if not d.isdigit()},
        key=lambda d: (d not in ("H", "W"), d),
    )
    fill = f", with your sizes for {', '.join(named)}" if named else ""
    return (
        f"{what}: shapes of {unknown} nodes depend on dynamic input dims "
        f"({', '.join(dynamic_inputs(model)) or 'inputs'}); add {flags}{fill} "
        "(or --calib data of the real size)"
    )
