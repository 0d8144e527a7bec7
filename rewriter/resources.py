"""Files shipped with the package: the trained models and the report schema.

Installed (wheel), they sit inside the package (`rewriter/trained/`, `rewriter/docs/`); in the
repository (or an editable install) they are the top-level `models/trained/` and `docs/`.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _shipped(installed: str, repository: str) -> Path:
    inside = _HERE / installed
    return inside if inside.is_dir() else _HERE.parent / repository


def trained_dir() -> Path:
    """Folder of the shipped trained models and their calibration/test data."""
    return _shipped("trained", "models/trained")


def report_schema_path() -> Path:
    """The JSON schema of `--report out.json` (`rewrite --report-schema` prints it)."""
    return _shipped("docs", "docs") / "report-schema.json"
