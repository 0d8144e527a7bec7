"""Our own exception types: the CLI turns each into one line and an exit code.

Messages name the file, node and op involved so a user can act on them without a traceback.
"""

from __future__ import annotations


class OnexoneError(Exception):
    """Base class: a problem the user can fix (bad input, bad option); CLI exit code 1."""

    exit_code = 1


class ModelLoadError(OnexoneError):
    """The model file is missing, not ONNX, truncated, unsafe or an invalid graph."""


class ModelSaveError(OnexoneError):
    """The rewritten model failed validation or could not be written; nothing was written."""


class PassError(OnexoneError):
    """A pass could not run (unknown pass, bad option, missing data)."""


class CalibrationError(OnexoneError):
    """Calibration data is missing, unreadable or does not match the model's inputs."""


class UsageError(OnexoneError):
    """The command line or pipeline config is malformed; CLI exit code 2."""

    exit_code = 2


class QualityGateError(OnexoneError):
    """A quality gate (--max-drop, --min-cosine, --min-speedup) failed; CLI exit code 3."""

    exit_code = 3


class InternalCheckError(OnexoneError):
    """A pass moved the outputs beyond its own declared bound: a bug, its output is discarded."""


class ResourceLimitError(OnexoneError):
    """A run would exceed a time or memory limit; the message names the limit and how to raise
    it (exit code 1)."""


class DetectionError(OnexoneError):
    """Detector outputs, detections or ground truth are not in the layout the metric reads."""
