"""onexone: rewrite trained ONNX models with 1x1-convolution tricks, proven in onnxruntime.

    import rewriter
    model = rewriter.load("model.onnx")
    result = rewriter.rewrite(model, ["fold-bn", "bottleneck"], calib="calib.npz")
    rewriter.save(result.model, "out.onnx")
    print(result.report.to_markdown())
"""

from __future__ import annotations

__version__ = "0.1.0"

from rewriter.analyze import analyze
from rewriter.errors import (
    CalibrationError,
    InternalCheckError,
    ModelLoadError,
    ModelSaveError,
    OnexoneError,
    PassError,
    QualityGateError,
    ResourceLimitError,
    UsageError,
)
from rewriter.io import load, save
from rewriter.pipeline import PassSpec, RewriteResult, parse_pass_spec, rewrite

__all__ = [
    "CalibrationError",
    "InternalCheckError",
    "ModelLoadError",
    "ModelSaveError",
    "OnexoneError",
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
