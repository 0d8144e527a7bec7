"""Benchmark of the `dense-head` pass: head parameters and accuracy on the trained digits model
(closed-form fit, then head distillation), the zoo ConvNet's parameter cut, and the exact case
(PP-OCR cls, zoo GAP heads): parameters, max relative output error, latency A/B.

    .venv/bin/python -m bench.bench_dense_head          # quick (~3 min on 2 cores)
    .venv/bin/python -m bench.bench_dense_head --full   # more widths, longer distillation

Writes bench/results/dense_head.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import rewrite_digits_and_score, zoo_model
from bench.tables import dense_head_markdown
from rewriter import load, runtime
from rewriter.bench import benchmark_models, machine_info
from rewriter.calibration import CalibrationSet
from rewriter.pipeline import rewrite
from rewriter.shapes import with_input_shapes

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "dense_head.json"
TRAINED = ROOT / "models" / "trained"

QUICK_DIGITS = [("hidden=0", 0), ("hidden=0", 1000), ("hidden=16", 0), ("hidden=16", 1000)]
FULL_DIGITS = [(h, steps) for h in ("hidden=0", "hidden=8", "hidden=16", "keep widths")
               for steps in (0, 1000, 4000)]
QUICK_GAP_ZOO = ["mobilenetv2"]
FULL_GAP_ZOO = ["mobilenetv2", "resnet50", "googlenet"]


def _head(result) -> dict[str, Any]:
    (report,) = result.report.passes
    decisions = [d for d in report.decisions if d.applied]
    return {
        "applied": len(decisions),
        "kinds": [d.details.get("kind") for d in decisions],
        "head_params_before": sum(d.params_before or 0 for d in decisions),
        "head_params_after": sum(d.params_after or 0 for d in decisions),
        "reasons_skipped": sorted({d.reason for d in report.decisions if not d.applied}),
        "decisions": decisions,
    }


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-30))


def _latency(result, min_time_s: float, input_shapes=None) -> dict[str, Any]:
    original, rewritten = result.original, result.model
    if input_shapes:  # PP-OCR declares its batch dim as -1: fix every input dim for timing
        original = with_input_shapes(original, input_shapes)
        rewritten = with_input_shapes(rewritten, input_shapes)
    lat = benchmark_models(original, rewritten, input_shapes=input_shapes, threads=1,
                           batches=[1], min_time_s=min_time_s)
    return {"original_ms": lat["original_ms"]["median"],
            "rewritten_ms": lat["rewritten_ms"]["median"],
            "speedup": lat["speedup"]["median"], "speedup_p10": lat["speedup"]["p10"],
            "speedup_p90": lat["speedup"]["p90"], "threads": 1, "batch": 1}


def digits_case(hidden: str, distill: int) -> dict[str, Any]:
    """Fitted head on the trained digits CNN; accuracy on its test split."""
    calib = dict(np.load(TRAINED / "digits_calib.npz"))
    test = dict(np.load(TRAINED / "digits_test.npz"))
    data = CalibrationSet({"input": calib["input"]}, calib["labels"], "digits_calib.npz")
    options = [] if hidden == "keep widths" else [hidden]
    if distill:
        options.append(f"distill={distill}")
    spec = "dense-head" + (":" + ",".join(options) if options else "")
    result, rewrite_s, ref, got = rewrite_digits_and_score([spec], data, test["input"])
    labels = test["labels"]
    head = _head(result)
    (decision,) = head.pop("decisions")
    acc_before = float(np.mean(ref.argmax(1) == labels))
    acc_after = float(np.mean(got.argmax(1) == labels))
    return {
        "options": spec, "kind": decision.details["kind"],
        "head_params_before": head["head_params_before"],
        "head_params_after": head["head_params_after"],
        "head_params_cut": round(1 - head["head_params_after"] / head["head_params_before"], 4),
        "layers_after": decision.details["layers_after"],
        "test_accuracy_before": round(acc_before, 4),
        "test_accuracy_after": round(acc_after, 4),
        "accuracy_drop_points": round(100 * (acc_before - acc_after), 2),
        "test_top1_agreement": round(float(np.mean(ref.argmax(1) == got.argmax(1))), 4),
        "test_rel_l2": round(float(np.linalg.norm(got - ref) / np.linalg.norm(ref)), 4),
        "holdout_rel_l2": round(decision.details["fidelity"]["rel_l2"], 4),
        "rewrite_s": round(rewrite_s, 2),
    }


def convnet_case(min_time_s: float) -> dict[str, Any]:
    """The zoo's classic ConvNet (random weights): structure and parameter cut only."""
    result = rewrite(load(zoo_model("convnet")), ["dense-head"], calib="random")
    head = _head(result)
    head.pop("decisions")
    report = result.report
    return {"model": "convnet (random weights, random calib: fidelity not meaningful)", **head,
            "model_params_before": report.params_before, "model_params_after": report.params_after,
            "params_cut": round(1 - report.params_after / report.params_before, 4),
            "latency": _latency(result, min_time_s)}


def exact_case(name: str, path: Path, sizes: list[tuple[int, ...]], input_name: str,
               min_time_s: float) -> dict[str, Any]:
    """An exact head rewrite: max relative error over several input sizes, params, latency."""
    result = rewrite(load(path), ["dense-head"])
    head = _head(result)
    head.pop("decisions")
    errors = {}
    rng = np.random.default_rng(0)
    for shape in sizes:
        feeds = {input_name: rng.standard_normal(shape).astype(np.float32)}
        try:
            ref = runtime.run_all(result.original, feeds)
        except Exception:  # noqa: BLE001 - the original has a fixed input size
            errors["x".join(map(str, shape))] = "original does not accept this size"
            continue
        got = runtime.run_all(result.model, feeds)
        errors["x".join(map(str, shape))] = max(_max_rel(ref[k], got[k]) for k in ref)
    numeric = [e for e in errors.values() if isinstance(e, float)]
    return {"model": name, **head, "max_rel_error": max(numeric) if numeric else None,
            "max_rel_error_by_input": errors,
            "latency": _latency(result, min_time_s, {input_name: sizes[0]})}


def _ppocr_cls() -> Path | None:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"


def run(full: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    min_time = 2.0 if full else 0.5
    out: dict[str, Any] = {"topic": "dense_head", "full": full, "machine": machine_info(1)}
    if (TRAINED / "digits_cnn.onnx").exists():
        cases = FULL_DIGITS if full else QUICK_DIGITS
        if importlib.util.find_spec("torch") is None:
            cases = [c for c in cases if not c[1]]
        out["digits"] = [digits_case(h, s) for h, s in cases]
    else:
        out["digits"] = {"skipped": "models/trained/digits_cnn.onnx missing"}
    out["convnet"] = convnet_case(min_time)
    cls = _ppocr_cls()
    out["exact"] = []
    if cls is not None:
        out["exact"].append(exact_case("PP-OCR cls (ch_ppocr_mobile_v2.0)", cls,
                                       [(1, 3, 48, 192), (4, 3, 48, 192), (2, 3, 64, 320)],
                                       "x", min_time))
    for name in FULL_GAP_ZOO if full else QUICK_GAP_ZOO:
        out["exact"].append(exact_case(f"zoo {name}", zoo_model(name),
                                       [(1, 3, 224, 224), (2, 3, 224, 224)], "input", min_time))
    out["elapsed_s"] = round(time.perf_counter() - started, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    out["markdown"] = dense_head_markdown(out)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    print(json.dumps(run(full=parser.parse_args().full), indent=2))


if __name__ == "__main__":
    main()
