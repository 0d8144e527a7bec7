"""Export zoo models to ONNX with torch's legacy (TorchScript) exporter, and verify them.

The legacy exporter is used on purpose: it emits plain, stable op sets (Conv, Gemm,
BatchNormalization, ...) that the rewriter targets, whereas the dynamo exporter produces
different graph idioms. Constant folding is off by default because, in eval mode, the legacy
exporter's folding pass fuses BatchNorm into Conv; keeping BatchNormalization nodes gives
BN-folding passes real work.

Usage::

    python -m models.export NAME|all -o DIR [--opset N] [--dynamic-batch] [--verify]
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from models.zoo import ZOO, build, example_input

DEFAULT_OPSET = 17
# Highest opset torch's legacy exporter supports (torch 2.13:
# torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET). Newer opsets need dynamo=True.
MAX_EXPORT_OPSET = 20
MIN_EXPORT_OPSET = 11  # oldest opset the zoo is tested at

DynamicAxes = Mapping[str, Mapping[int, str]]
Inputs = torch.Tensor | tuple[torch.Tensor, ...]


def batch_axes(names: Sequence[str]) -> dict[str, dict[int, str]]:
    """Dynamic-axes mapping that makes dim 0 of every named tensor a symbolic "batch"."""
    return {name: {0: "batch"} for name in names}


def export_module(
    module: nn.Module,
    example: Inputs,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] = ("output",),
    dynamic_axes: DynamicAxes | None = None,
    do_constant_folding: bool = False,
) -> Path:
    """Export ``module`` (in eval mode) to ``path`` with the legacy exporter; return the path.

    ``do_constant_folding=False`` keeps BatchNormalization nodes (see module docstring).
    The module's train/eval mode is restored afterwards.
    """
    if not MIN_EXPORT_OPSET <= opset <= MAX_EXPORT_OPSET:
        raise ValueError(
            f"opset {opset} outside the legacy exporter's tested range "
            f"[{MIN_EXPORT_OPSET}, {MAX_EXPORT_OPSET}]"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = example if isinstance(example, tuple) else (example,)
    axes = {name: dict(dims) for name, dims in dynamic_axes.items()} if dynamic_axes else None
    was_training = module.training
    module.eval()
    try:
        with warnings.catch_warnings():
            # The legacy exporter is the deliberate choice here; silence its deprecation notice.
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=axes,
                do_constant_folding=do_constant_folding,
            )
    finally:
        module.train(was_training)
    return path


def export(
    name: str, path: str | Path, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False
) -> Path:
    """Build zoo model ``name`` and export it; return the written ``.onnx`` path.

    ``path`` is a file if it ends in ``.onnx``, otherwise a directory receiving ``NAME.onnx``.
    The graph has one input "input" and one output "output".
    """
    path = Path(path)
    target = path if path.suffix == ".onnx" else path / f"{name}.onnx"
    module, shape = build(name)
    return export_module(
        module,
        example_input(shape),
        target,
        opset=opset,
        dynamic_axes=batch_axes(("input", "output")) if dynamic_batch else None,
    )


def run_onnx(path: str | Path, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run an ONNX file on CPU with onnxruntime, with graph optimisations disabled.

    Disabling ORT's optimiser means we compare the graph as written, not ORT's fused version.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, dict(inputs))


def max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference divided by the reference's largest magnitude.

    Scaling by the tensor's magnitude rather than per element avoids blow-ups on near-zero
    entries, which are common after ReLU.
    """
    scale = max(float(np.abs(expected).max()), np.finfo(np.float32).tiny)
    return float(np.abs(actual - expected).max()) / scale


def verify_export(
    path: str | Path, module: nn.Module, example: torch.Tensor, rtol: float = 1e-4
) -> float:
    """Full-check ``path`` and compare onnxruntime against torch; return the relative error.

    Raises ``AssertionError`` when the error exceeds ``rtol`` (see ``max_relative_error``).
    """
    onnx.checker.check_model(str(path), full_check=True)
    with torch.no_grad():
        expected = module.eval()(example).numpy()
    input_name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    (actual,) = run_onnx(path, {input_name: example.numpy()})
    error = max_relative_error(actual, expected)
    if error > rtol:
        raise AssertionError(f"{path}: onnxruntime differs from torch by {error:.3g} > {rtol}")
    return error


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m models.export", description=__doc__)
    parser.add_argument("name", choices=[*ZOO, "all"], help="zoo model to export, or 'all'")
    parser.add_argument("-o", "--output-dir", type=Path, required=True)
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--dynamic-batch", action="store_true", help="symbolic batch dim")
    parser.add_argument("--verify", action="store_true", help="check + compare with onnxruntime")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: export one or all zoo models into a directory."""
    args = _parse_args(argv)
    names = list(ZOO) if args.name == "all" else [args.name]
    for name in names:
        path = export(name, args.output_dir, opset=args.opset, dynamic_batch=args.dynamic_batch)
        message = f"{name}: {path}"
        if args.verify:
            module, shape = build(name)
            error = verify_export(path, module, example_input(shape))
            message += f" (verified, max rel err {error:.2g})"
        print(message)


if __name__ == "__main__":
    main()
