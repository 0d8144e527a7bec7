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


def rewrite_digits_and_score(passes: list[str], calib, test_inputs) -> tuple:
    """Rewrite the shipped digits CNN and return (result, rewrite seconds, original logits,
    rewritten logits) on the test inputs: the measurement both accuracy benchmarks make."""
    import time

    from rewriter import load, runtime
    from rewriter.pipeline import rewrite

    trained = Path(__file__).resolve().parents[1] / "models" / "trained"
    started = time.perf_counter()
    result = rewrite(load(trained / "digits_cnn.onnx"), passes, calib=calib)
    rewrite_s = time.perf_counter() - started
    feeds = {"input": test_inputs}
    ref = runtime.run_all(result.original, feeds)["logits"]
    got = runtime.run_all(result.model, feeds)["logits"]
    return result, rewrite_s, ref, got


def one_mode(extra: str) -> str:
    """`extra`, naming `mode=in` unless it names a mode or method: these rows measure one
    factorization everywhere (the pass's default with a target is method=auto)."""
    return extra if "mode=" in extra or "method=" in extra else f"{extra},mode=in"
