"""Helpers every benchmark topic shares."""

from __future__ import annotations

from pathlib import Path

#: Zoo exports are cached here across topics and runs (random weights: latency does not depend
#: on the values, and exporting VGG-16 takes a while).
ZOO_CACHE = Path("/tmp/onexone-bench/zoo")


def zoo_model(name: str) -> Path:
    """The zoo model `name` exported with a dynamic batch dim (exported once, then cached)."""
    from models.export import export

    path = ZOO_CACHE / f"{name}-dyn.onnx"
    if not path.exists():
        ZOO_CACHE.mkdir(parents=True, exist_ok=True)
        export(name, path, dynamic_batch=True)
    return path
