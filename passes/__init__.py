"""Registered passes by name. One module per pass; each registers itself on import."""

from __future__ import annotations

import importlib

from passes.base import PassOptions, RewritePass, describe_options, option, parse_options
from rewriter.errors import PassError

_REGISTRY: dict[str, type[RewritePass]] = {}

#: Modules that define passes, imported once on first lookup (keeps `import passes` cheap).
_PASS_MODULES = (
    "passes.cleanup",
    "passes.fold_bn",
    "passes.bottleneck",
    "passes.spatial_svd",
    "passes.dense_head",
    "passes.merge_1x1",
    "passes.deepen",
    "passes.quantize",
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
        raise PassError(f"unknown pass '{name}' (known passes: {known})") from None


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
