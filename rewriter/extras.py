"""Optional extras: check one is installed before any work, and name the pip command if not."""

from __future__ import annotations

import importlib.util

from rewriter.errors import MissingDependencyError

#: The pip extra that brings each optional module.
EXTRA_OF = {"torch": "finetune", "matplotlib": "plot", "PIL": "images"}


def installed(module: str) -> bool:
    """True when `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, extra: str, feature: str) -> None:
    """Raise one line naming the extra when `module` is missing."""
    if not installed(module):
        raise MissingDependencyError(
            f"{feature} needs {module}, which is not installed: pip install 'onexone[{extra}]'"
        )


def require_image_decoder() -> None:
    """Image folders decode with Pillow (the `images` extra) or an installed OpenCV."""
    if not installed("PIL") and not installed("cv2"):
        raise MissingDependencyError(
            "calibration from an image folder needs Pillow, which is not installed: "
            "pip install 'onexone[images]'"
        )
