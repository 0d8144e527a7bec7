"""Our own exception types: the CLI turns each into one line and an exit code.

Messages name the file, node and op involved so a user can act on them without a traceback.
"""

from __future__ import annotations

#: Exit codes of the `rewrite` command, defined once (the exception types below carry them).
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_GATE = 0, 1, 2, 3


class OnexoneError(Exception):
    """Base class: a problem the user can fix (bad input, bad option); CLI exit code 1."""

    exit_code = EXIT_FAILURE


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

    exit_code = EXIT_USAGE


class OptionError(UsageError, PassError):
    """An option is misspelt, mistyped or out of range (a pass's, distill's, preprocess's);
    a usage error (exit 2), still caught by `except PassError` as before."""


class MissingDependencyError(OnexoneError):
    """An optional extra the run needs is not installed; the message names the pip command."""


class QualityGateError(OnexoneError):
    """A quality gate (--max-drop, --min-cosine, --min-speedup) failed; CLI exit code 3."""

    exit_code = EXIT_GATE


class InternalCheckError(OnexoneError):
    """A pass moved the outputs beyond its own declared bound: a bug, its output is discarded."""


class DetectionError(OnexoneError):
    """Detector outputs, detections or ground truth are not in the layout the metric reads."""


class ResourceLimitError(OnexoneError):
    """A run would exceed a time or memory limit; the message names the limit and how to raise
    it (exit code 1)."""


def in_cli_terms(exc: OnexoneError) -> str:
    """The message as the command line says it: the API's `calib X:` is the flag `--calib X:`.

    The library speaks the Python API's terms (`rewrite(..., calib=...)`); only the CLI, which
    knows it was given a flag, renames the argument.
    """
    message = str(exc)
    if isinstance(exc, CalibrationError) and message.startswith(("calib ", "calib:")):
        return "--" + message
    return message
