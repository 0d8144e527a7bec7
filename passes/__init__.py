"""Registered passes by name. One module per pass; each registers itself on import."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rewriter.errors import OptionError
from rewriter.options import describe_options, did_you_mean, option

if TYPE_CHECKING:  # pragma: no cover
    from rewriter.passes.base import PassOptions, RewritePass, parse_options


def __getattr__(name: str) -> Any:
    """`PassOptions`, `RewritePass`, `parse_options` load onnx-ir on first use only."""
    if name in ("PassOptions", "RewritePass", "parse_options"):
        return getattr(importlib.import_module("rewriter.passes.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_REGISTRY: dict[str, type[RewritePass]] = {}

#: Modules that define passes, imported once on first lookup (keeps `import passes` cheap).
_PASS_MODULES = (
    "rewriter.passes.cleanup",
    "rewriter.passes.fold_bn",
    "rewriter.passes.bottleneck",
    "rewriter.passes.spatial_svd",
    "rewriter.passes.dense_head",
    "rewriter.passes.merge_1x1",
    "rewriter.passes.deepen",
    "rewriter.passes.quantize",
)
_loaded = False


def register(cls: type[RewritePass]) -> type[RewritePass]:
    """Class decorator: make a pass available by its `name`."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for module in _PASS_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a real import error inside an existing pass module
                raise
    _loaded = True


def get_pass(name: str) -> type[RewritePass]:
    """The pass class registered as `name` (a clear error listing the known names otherwise)."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise OptionError(
            f"unknown pass '{name}'{did_you_mean(name, _REGISTRY)} (known passes: {known})"
        ) from None


def available() -> dict[str, type[RewritePass]]:
    """All registered passes by name, sorted."""
    _load_all()
    return dict(sorted(_REGISTRY.items()))


__all__ = [
    "PassOptions",
    "RewritePass",
    "available",
    "describe_options",
    "get_pass",
    "option",
    "parse_options",
    "register",
]
