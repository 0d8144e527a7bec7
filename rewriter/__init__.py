"""onexone: rewrite trained ONNX models with 1x1-convolution tricks, proven in onnxruntime.

    import rewriter
    model = rewriter.load("model.onnx")
    result = rewriter.rewrite(model, ["fold-bn", "bottleneck:target=0.5"], calib="calib.npz")
    rewriter.save(result, "out.onnx")          # writes the model and completes the report
    print(result.report.to_markdown())

`import rewriter` is cheap: onnx, onnx-ir and onnxruntime load on first use of the API.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rewriter.errors import (
    CalibrationError,
    InternalCheckError,
    MissingDependencyError,
    ModelLoadError,
    ModelSaveError,
    OnexoneError,
    OptionError,
    PassError,
    QualityGateError,
    ResourceLimitError,
    UsageError,
)

__version__ = "0.1.0"

#: Public names loaded on first access (PEP 562), so importing the package starts nothing heavy.
_LAZY = {
    "analyze": "rewriter.analysis",
    "load": "rewriter.io",
    "save": "rewriter.saving",
    "PassSpec": "rewriter.pipeline",
    "RewriteResult": "rewriter.pipeline",
    "parse_pass_spec": "rewriter.pipeline",
    "rewrite": "rewriter.pipeline",
    "CalibrationSet": "rewriter.calibration",
}

if TYPE_CHECKING:  # pragma: no cover
    from rewriter.analysis import analyze
    from rewriter.calibration import CalibrationSet
    from rewriter.io import load
    from rewriter.pipeline import PassSpec, RewriteResult, parse_pass_spec, rewrite
    from rewriter.saving import save


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    try:  # `rewriter.calibration` and friends as attributes, as after an eager import
        return importlib.import_module(f"rewriter.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"rewriter.{name}":
            raise
        raise AttributeError(f"module 'rewriter' has no attribute '{name}'") from None


__all__ = [
    "CalibrationError",
    "CalibrationSet",
    "InternalCheckError",
    "MissingDependencyError",
    "ModelLoadError",
    "ModelSaveError",
    "OnexoneError",
    "OptionError",
    "PassError",
    "PassSpec",
    "QualityGateError",
    "ResourceLimitError",
    "RewriteResult",
    "UsageError",
    "__version__",
    "analyze",
    "load",
    "parse_pass_spec",
    "rewrite",
    "save",
]
