"""Benchmark of the `bottleneck` pass: MAC reduction vs measured onnxruntime speedup on zoo
models (random weights: latency does not depend on values), and accuracy vs MAC reduction per
init on the trained digits model.

    .venv/bin/python -m bench.bench_bottleneck          # quick (~3 min on 2 cores)
    .venv/bin/python -m bench.bench_bottleneck --full   # the whole matrix (long)

Writes bench/results/bottleneck.json. Efficiency = speedup / MAC reduction (both as ratios
before/after): 1.0 means the runtime turns every MAC saved into time saved. The `objective`
rows compare `objective=macs` with `objective=latency` (layers timed in onnxruntime first,
those not faster skipped): latency may remove fewer MACs for a higher efficiency. The `methods`
rows put `method=auto` (per layer in / in-out / spatial) beside `bottleneck` alone, with the
onnxruntime sessions each run opened.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import one_mode, rewrite_digits_and_score, zoo_model
from bench.tables import bottleneck_markdown
from rewriter import load
from rewriter.bench import benchmark_models, machine_info
from rewriter.calibration import CalibrationSet
from rewriter.pipeline import rewrite

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "bottleneck.json"
TRAINED = ROOT / "models" / "trained"

QUICK_ZOO = [("inception3a", "in", 0.25, "macs"), ("inception3a", "in", 0.25, "latency"),
             ("vgg16", "in", 0.25, "macs")]
#: objective=macs vs objective=latency at the issue's target ratio (full run).
OBJECTIVE_CASES = [(m, mode, 0.25, obj) for m, mode in (("vgg16", "in"), ("resnet50", "in-out"),
                                                       ("inception3a", "in"))
                   for obj in ("macs", "latency")]
FULL_ZOO_MODELS = [("vgg16", "in"), ("resnet50", "in-out"), ("googlenet", "in"),
                   ("inception3a", "in")]
FULL_RATIOS = (0.5, 0.25, 0.125)
DIGITS_TARGETS = (0.5, 0.7, 0.8, 0.9)
INITS = ("svd", "whitened", "refit")



def zoo_case(name: str, mode: str, ratio: float, threads: list[int], batches: list[int],
             min_time_s: float, objective: str = "macs") -> dict[str, Any]:
    """Rewrite one zoo model (svd init) and time it against the original."""
    started = time.perf_counter()
    spec = f"bottleneck:ratio={ratio},mode={mode},objective={objective}"
    result = rewrite(load(zoo_model(name)), [spec], guard=False)
    rewrite_s = time.perf_counter() - started
    report = result.report
    mac_reduction = report.macs_before / max(report.macs_after, 1)
    row: dict[str, Any] = {
        "model": name, "mode": mode, "ratio": ratio, "objective": objective,
        "macs_before": report.macs_before, "macs_after": report.macs_after,
        "mac_reduction": round(mac_reduction, 4),
        "layers_rewritten": report.passes[0].metrics.get("layers_rewritten", 0),
        "rewrite_s": round(rewrite_s, 2), "latency": [],
    }
    if objective == "latency":
        decisions = report.passes[0].decisions
        row["layers_not_faster"] = [d.node for d in decisions
                                    if d.reason.startswith("not faster in onnxruntime")]
        row["layer_timings"] = [{"layer": d.node, "rank": d.details.get("rank"),
                                 **{k: d.details[k] for k in ("layer_ms_before", "layer_ms_after",
                                                              "layer_speedup")}}
                                for d in decisions if "layer_ms_before" in d.details]
    for t in threads:
        lat = benchmark_models(result.original, result.model, threads=t, batches=batches,
                               min_time_s=min_time_s)
        for entry in lat.get("batches", [lat]):
            speedup = entry["speedup"]["median"]
            row["latency"].append({
                "threads": t, "batch": entry["batch"],
                "original_ms": entry["original_ms"]["median"],
                "rewritten_ms": entry["rewritten_ms"]["median"],
                "speedup": speedup, "speedup_p10": entry["speedup"]["p10"],
                "speedup_p90": entry["speedup"]["p90"],
                "efficiency": round(speedup / mac_reduction, 4),
            })
    return row


def _digits_data() -> tuple[CalibrationSet, dict[str, np.ndarray]]:
    calib = dict(np.load(TRAINED / "digits_calib.npz"))
    test = dict(np.load(TRAINED / "digits_test.npz"))
    return CalibrationSet({"input": calib["input"]}, calib["labels"], "digits_calib.npz"), test


def digits_case(init: str, target: float, extra: str = "") -> dict[str, Any]:
    """Rewrite the trained digits CNN to remove `target` of its MACs; accuracy on the test split."""
    calib, test = _digits_data()
    spec = f"bottleneck:target={target},init={init},sensitivity=false{one_mode(extra)}"
    result, rewrite_s, ref, got = rewrite_digits_and_score([spec], calib, test["input"])
    labels = test["labels"]
    report = result.report
    return {
        "init": init, "target": target, "options": spec,
        "macs_removed": round(1 - report.macs_after / report.macs_before, 4),
        "mac_reduction": round(report.macs_before / max(report.macs_after, 1), 3),
        "accuracy_before": round(float(np.mean(ref.argmax(1) == labels)), 4),
        "accuracy_after": round(float(np.mean(got.argmax(1) == labels)), 4),
        "top1_agreement": round(float(np.mean(ref.argmax(1) == got.argmax(1))), 4),
        "rel_l2": round(float(np.linalg.norm(got - ref) / np.linalg.norm(ref)), 5),
        "rewrite_s": round(rewrite_s, 2),
    }


def ocr_case(kind: str, shape: tuple[int, ...]) -> dict[str, Any]:
    """MAC reduction of a PP-OCRv4 model at the default ratio (svd; no OCR line test here)."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        return {"model": kind, "skipped": "rapidocr-onnxruntime not installed"}
    names = {"det": "ch_PP-OCRv4_det_infer.onnx", "rec": "ch_PP-OCRv4_rec_infer.onnx"}
    path = Path(spec.origin).parent / "models" / names[kind]
    result = rewrite(load(path), ["bottleneck"], input_shapes={"x": shape}, guard=False)
    report = result.report
    decisions = report.passes[0].decisions
    reasons: dict[str, int] = {}
    for d in decisions:
        if not d.applied:
            reasons[d.reason] = reasons.get(d.reason, 0) + 1
    return {
        "model": f"PP-OCRv4 {kind}", "input_shape": list(shape),
        "macs_before": report.macs_before, "macs_after": report.macs_after,
        "macs_removed": round(1 - report.macs_after / max(report.macs_before, 1), 4),
        "applied": sum(d.applied for d in decisions), "skipped_by_reason": reasons,
    }


METHOD_TARGETS = (0.5, 0.7, 0.8)


def method_rows(full: bool) -> list[dict[str, Any]]:
    """`bottleneck` alone (mode=in) beside `method=auto` (per layer in / in-out / spatial on
    measured errors) at the same MAC targets: digits CNN (accuracy on its test split) and, in
    the full run, PP-OCRv4 det on rendered pages (held-out worst-output cosine)."""
    from rewriter import runtime

    rows: list[dict[str, Any]] = []
    if (TRAINED / "digits_cnn.onnx").exists():
        calib, test = _digits_data()
        for target in METHOD_TARGETS:
            for method in ("mode", "auto"):
                spec = f"bottleneck:target={target},init=refit,method={method}"
                opened = runtime.SESSIONS_OPENED
                result, rewrite_s, ref, got = rewrite_digits_and_score(["fold-bn", spec], calib,
                                                                       test["input"])
                rows.append(_method_row("digits CNN", spec, result, rewrite_s, opened) | {
                    "accuracy_before": round(float(np.mean(ref.argmax(1) == test["labels"])), 4),
                    "accuracy_after": round(float(np.mean(got.argmax(1) == test["labels"])), 4),
                    "top1_agreement": round(float(np.mean(ref.argmax(1) == got.argmax(1))), 4)})
    if full:
        rows += _det_method_rows()
    rows.append({"model": "trained detector", "skipped": "models/trained/detector.onnx is not "
                 "on main yet (engineer det)"} if not (TRAINED / "detector.onnx").exists()
                else _detector_method_rows())
    return rows


def _method_row(model: str, spec: str, result, rewrite_s: float, opened: int) -> dict:
    from rewriter import runtime

    report = result.report
    decisions = [d for d in report.passes[-1].decisions if d.applied]
    methods: dict[str, int] = {}
    for d in decisions:
        key = d.details.get("method", "in")
        methods[key] = methods.get(key, 0) + 1
    return {"model": model, "options": spec,
            "macs_removed": round(1 - report.macs_after / max(report.macs_before, 1), 4),
            "cosine": round(float(report.fidelity.get("cosine", float("nan"))), 5),
            "methods": methods, "sessions": runtime.SESSIONS_OPENED - opened,
            "rewrite_s": round(rewrite_s, 2)}


def _det_method_rows() -> list[dict[str, Any]]:
    if importlib.util.find_spec("rapidocr_onnxruntime") is None:
        return [{"model": "PP-OCRv4 det", "skipped": "rapidocr-onnxruntime not installed"}]
    from models.ocr_data import det_calibration
    from rewriter import runtime

    spec_path = Path(importlib.util.find_spec("rapidocr_onnxruntime").origin).parent
    path = spec_path / "models" / "ch_PP-OCRv4_det_infer.onnx"
    data = CalibrationSet(det_calibration(8), source="rendered pages")
    rows = []
    for method in ("mode", "auto"):
        spec = f"bottleneck:target=0.4,init=whitened,method={method},measure-ranks=2"
        opened, started = runtime.SESSIONS_OPENED, time.perf_counter()
        result = rewrite(load(path), [spec], calib=data, holdout=0.25)
        rows.append(_method_row("PP-OCRv4 det", spec, result, time.perf_counter() - started,
                                opened))
    return rows


def _detector_method_rows() -> list[dict[str, Any]]:
    from rewriter import runtime

    calib = dict(np.load(TRAINED / "detector_calib.npz"))
    data = CalibrationSet({"images": calib["images"]}, source="detector_calib.npz")
    rows = []
    for method in ("mode", "auto"):
        spec = f"bottleneck:target=0.5,init=refit,method={method},measure-ranks=2"
        opened, started = runtime.SESSIONS_OPENED, time.perf_counter()
        result = rewrite(load(TRAINED / "detector.onnx"), [spec], calib=data)
        rows.append(_method_row("trained detector", spec, result,
                                time.perf_counter() - started, opened))
    return rows


def run(full: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    out: dict[str, Any] = {"topic": "bottleneck", "full": full, "machine": machine_info(1)}
    if full:
        cases = [(m, mode, r, "macs") for m, mode in FULL_ZOO_MODELS for r in FULL_RATIOS]
        threads, batches, min_time = [1, 2], [1, 8], 2.0
        out["objective"] = [zoo_case(m, mode, r, [1], batches, min_time, obj)
                            for m, mode, r, obj in OBJECTIVE_CASES]
    else:
        cases, threads, batches, min_time = QUICK_ZOO, [1], [1], 1.0
    out["zoo"] = [zoo_case(m, mode, r, threads, batches, min_time, obj)
                  for m, mode, r, obj in cases]
    if (TRAINED / "digits_cnn.onnx").exists():
        out["digits"] = [digits_case(init, t) for init in INITS for t in DIGITS_TARGETS]
    else:
        out["digits"] = {"skipped": "models/trained/digits_cnn.onnx missing "
                                    "(python -m models.digits)"}
    out["methods"] = method_rows(full)
    if full:
        out["ocr"] = [ocr_case("det", (1, 3, 640, 640)), ocr_case("rec", (1, 3, 48, 320))]
    out["summary"] = summarize(out)
    out["wall_s"] = round(time.perf_counter() - started, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    out["markdown"] = bottleneck_markdown(out)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    return out


def summarize(out: dict[str, Any]) -> dict[str, Any]:
    """The numbers the issue's targets ask for."""
    summary: dict[str, Any] = {}
    for row in out.get("zoo", []) + out.get("objective", []):
        for lat in row["latency"]:
            if lat["threads"] != 1:
                continue
            key = (f"{row['model']} {row['mode']} ratio={row['ratio']} "
                   f"objective={row.get('objective', 'macs')} batch={lat['batch']}")
            summary[key] = {"mac_reduction": row["mac_reduction"], "speedup": lat["speedup"],
                            "efficiency": lat["efficiency"]}
    digits = out.get("digits")
    if isinstance(digits, list):
        refit = [r for r in digits if r["init"] == "refit"]
        ok = [r for r in refit if r["macs_removed"] >= 0.8
              and r["accuracy_before"] - r["accuracy_after"] <= 0.003]
        summary["digits_refit_80pct_within_0.3pt"] = bool(ok)
        summary["digits_best_refit_at_80pct"] = max(
            (r for r in refit if r["macs_removed"] >= 0.8),
            key=lambda r: r["accuracy_after"], default=None)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args()
    result = run(full=args.full)
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
