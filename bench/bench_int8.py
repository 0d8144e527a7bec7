"""Against what users pick instead: onnxruntime static int8, alone and composed with `bottleneck`.

Per model (the trained detector, the trained digits CNN, PP-OCRv4 det in the rapidocr pipeline):
float; static int8 plain (`quantize:auto-exclude=false`) and with measured auto-exclusion
(`quantize`); `fold-bn` + `bottleneck` refit; the same + `quantize`. For each: A/B interleaved
latency against float at 1 and 2 intra-op threads, batch 1; bottleneck + int8 also A/B against
int8 alone; the task metric (digits accuracy, detections F1 vs the float original, OCR lines
read unchanged); file size. Where bottleneck + int8 is not faster than int8 alone, onnxruntime's
profiler times each node of both models so the report can say which kernels ate the gain.

    .venv/bin/python -m bench.bench_int8          # quick: fewer pages and pairs
    .venv/bin/python -m bench.bench_int8 --full

Writes bench/results/int8.json. Models are cached under /tmp/onexone-bench-int8.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from rewriter import load
from rewriter.bench import NO_SPINNING, ab_latency, machine_info
from rewriter.io import save
from rewriter.pipeline import rewrite
from rewriter.runtime import session_options

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "int8.json"
CACHE = Path("/tmp/onexone-bench-int8")
TRAINED = ROOT / "models" / "trained"
#: Where the trained detector is read: models/trained, or a folder holding the same three files
#: (`ONEXONE_DETECTOR_DIR`, e.g. a fresh `python -m models.train_detector -o DIR` run).
DETECTOR_DIRS = tuple(Path(p) for p in filter(None, (os.environ.get("ONEXONE_DETECTOR_DIR"),))
                      ) + (TRAINED,)
#: The pass's default factorization choice (method=auto with a target and calibration data).
BOTTLENECK = "bottleneck:target=0.4,init=refit"
THREADS = (1, 2)

QUICK = {"pairs": 30, "ocr_pairs": 10, "ocr_pages": 6, "ocr_calib": 12, "ocr_max_calls": 4}
FULL = {"pairs": None, "ocr_pairs": None, "ocr_pages": 20, "ocr_calib": 24, "ocr_max_calls": 8}


@dataclass
class Case:
    """One model: its file, calibration npz, latency feed and task metric (higher is better)."""

    name: str
    model: Path
    calib: Path
    feed: dict[str, np.ndarray]
    metric_name: str
    metric: Callable[[Path], dict[str, Any]]
    max_calls: int = 10


def variants(max_calls: int) -> dict[str, list[str]]:
    quantize = f"quantize:max-calls={max_calls}"
    return {
        "int8": ["quantize:auto-exclude=false"],
        "int8-auto": [quantize],
        "bottleneck": ["fold-bn", BOTTLENECK],
        "bottleneck+int8": ["fold-bn", BOTTLENECK, quantize],
    }


# ------------------------------------------------------------------------------ task metrics


def _outputs(path: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All outputs of the model file at `path` on `inputs` (onnxruntime CPU)."""
    from rewriter.runtime import run_file

    return run_file(path, inputs)


def digits_case() -> Case:
    test = np.load(TRAINED / "digits_test.npz")

    def accuracy(path: Path) -> dict[str, Any]:
        logits = _outputs(path, {"input": test["input"]})["logits"]
        return {"accuracy": round(float(np.mean(logits.argmax(1) == test["labels"])), 4),
                "samples": len(test["labels"])}

    return Case("digits CNN", TRAINED / "digits_cnn.onnx", TRAINED / "digits_calib.npz",
                {"input": test["input"][:1]}, "accuracy", accuracy)


def detector_case() -> Case | None:
    folder = next((d for d in DETECTOR_DIRS if (d / "detector.onnx").exists()), None)
    if folder is None:
        return None
    from rewriter.detection import decode, detection_f1, load_ground_truth, map50

    test = np.load(folder / "detector_test.npz")
    images = test["images"]
    truth = load_ground_truth(folder / "detector_test.npz")
    reference = decode(_outputs(folder / "detector.onnx", {"images": images})["output0"])

    def f1(path: Path) -> dict[str, Any]:
        got = decode(_outputs(path, {"images": images})["output0"])
        return {"f1_vs_original": round(float(detection_f1(reference, got)), 4),
                "map50": round(float(map50(got, truth)), 4), "samples": len(images)}

    return Case("trained detector", folder / "detector.onnx", folder / "detector_calib.npz",
                {"images": images[:1]}, "f1_vs_original", f1)


def ocr_case(plan: Mapping[str, Any]) -> Case | None:
    try:
        from bench.bench_ocr import compare_readings, model_path, ocr_engine, read_pages
        from models.ocr_data import eval_pages, save_det_calibration
        det = model_path("det")
    except (ImportError, RuntimeError):
        return None
    calib = CACHE / f"ocr-calib-{plan['ocr_calib']}.npz"
    if not calib.exists():
        save_det_calibration(calib, plan["ocr_calib"])
    pages = eval_pages(plan["ocr_pages"])
    reference = read_pages(ocr_engine(det), pages)

    def lines(path: Path) -> dict[str, Any]:
        readings = compare_readings(reference, read_pages(ocr_engine(path), pages))
        return {"lines_unchanged": readings["unchanged_share"],
                "same_chars": readings["same_chars_share"], "lines": readings["lines"],
                "missing": readings["missing"], "pages": len(pages)}

    feed = {"x": np.load(calib)["x"][:1]}
    return Case("PP-OCRv4 det (rapidocr pipeline)", det, calib, feed, "lines_unchanged", lines,
                max_calls=plan["ocr_max_calls"])


# ---------------------------------------------------------------------------------- latency


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = session_options(threads)
    for key, value in NO_SPINNING.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ab(path_a: Path, path_b: Path, feed: Mapping[str, np.ndarray], threads: int,
       pairs: int | None) -> dict[str, Any]:
    """A/B interleaved latency, speedup = a / b per pair (median, p10, p90)."""
    result = ab_latency(_session(path_a, threads), _session(path_b, threads), feed,
                        repeats=pairs, min_time_s=2.0, label=f"A/B {threads} thr")
    return {"threads": threads, "a_ms": result["a_ms"]["median"],
            "b_ms": result["b_ms"]["median"], "speedup": result["speedup"]["median"],
            "speedup_p10": result["speedup"]["p10"], "speedup_p90": result["speedup"]["p90"],
            "pairs": result["repeats"]}


def profile_nodes(path: Path, feed: Mapping[str, np.ndarray], runs: int = 30,
                  top: int = 12) -> dict[str, Any]:
    """onnxruntime's profiler at 1 thread: per node and per op type, the median kernel time
    (ms) over `runs` runs after two warm-up runs (medians: the machine is shared)."""
    options = session_options(1)
    for key, value in NO_SPINNING.items():
        options.add_session_config_entry(key, value)
    with tempfile.TemporaryDirectory(prefix="onexone-profile-") as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "p")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(runs + 2):
            session.run(None, dict(feed))
        events = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    first = starts[2] if len(starts) > 2 else 0
    samples: dict[tuple[str, str], list[float]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if e["ts"] < first:
            continue
        key = (e.get("args", {}).get("op_name", "?"), e["name"].removesuffix("_kernel_time"))
        samples.setdefault(key, []).append(e["dur"] / 1e3)
    per_node = {key: float(np.median(v)) for key, v in samples.items()}
    per_op: dict[str, float] = {}
    for (op, _), ms in per_node.items():
        per_op[op] = per_op.get(op, 0.0) + ms
    ranked = sorted(per_node.items(), key=lambda kv: -kv[1])[:top]
    return {
        "per_op_ms": {k: round(v, 4) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])},
        "top_nodes_ms": [[f"{op} {node}", round(ms, 4)] for (op, node), ms in ranked],
        "total_ms": round(sum(per_node.values()), 4),
    }


def qdq_placement(path: Path) -> dict[str, Any]:
    """How many Q/DQ pairs the model holds, and how many sit between two convs in a row (a
    1x1 reduction followed by its kxk conv pays a requantization there)."""
    proto = onnx.load(str(path))
    producer = {o: n for n in proto.graph.node for o in n.output}
    q = sum(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    conv_to_conv = 0
    for node in proto.graph.node:
        if node.op_type != "Conv" or not node.input:
            continue
        dq = producer.get(node.input[0])
        quant = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" \
            else None
        src = producer.get(quant.input[0]) if quant is not None else None
        conv_to_conv += src is not None and src.op_type == "Conv"
    return {"quantize_linear": q, "conv_fed_by_requantized_conv": conv_to_conv,
            "convs": sum(n.op_type == "Conv" for n in proto.graph.node)}


# ------------------------------------------------------------------------------------- run


def run_case(case: Case, plan: Mapping[str, Any], tag: str) -> dict[str, Any]:
    pairs = plan["ocr_pairs"] if case.name.startswith("PP-OCR") else plan["pairs"]
    out: dict[str, Any] = {"model": case.name, "file": str(case.model),
                           "metric": case.metric_name, "rows": []}
    paths = {"float": case.model}
    base = {"variant": "float", "passes": [], "file_bytes": case.model.stat().st_size,
            **case.metric(case.model)}
    out["rows"].append(base)
    for name, passes in variants(case.max_calls).items():
        started = time.perf_counter()
        result = rewrite(load(case.model), passes, calib=str(case.calib))
        seconds = round(time.perf_counter() - started, 1)
        path = save(result.model, CACHE / f"{tag}-{name.replace('+', '-')}.onnx")
        paths[name] = path
        row: dict[str, Any] = {"variant": name, "passes": passes, "rewrite_s": seconds,
                               "file_bytes": path.stat().st_size,
                               "macs_removed": round(1 - result.report.macs_after
                                                     / max(result.report.macs_before, 1), 4),
                               "discarded": bool(result.discarded), **case.metric(path)}
        quant = next((p for p in result.report.passes if p.name == "quantize"), None)
        if quant is not None:
            m = quant.metrics
            row["quantize"] = {k: m.get(k) for k in (
                "quantize_static_calls", "task_error_plain", "task_error", "gate_met",
                "float_macs_share")}
            row["quantize"]["excluded"] = [
                {"block": e["block"], "nodes": len(e["nodes"]), "macs_in_float": e["macs_in_float"],
                 "task_error_after": e["task_error_after"]} for e in m.get("excluded", [])]
        row["latency"] = [ab(case.model, path, case.feed, t, pairs) for t in THREADS]
        out["rows"].append(row)
    out["bottleneck_int8_vs_int8"] = [
        ab(paths["int8-auto"], paths["bottleneck+int8"], case.feed, t, pairs) for t in THREADS]
    if min(r["speedup"] for r in out["bottleneck_int8_vs_int8"]) < 1.3:
        out["profile"] = {v: {**profile_nodes(paths[v], case.feed), **qdq_placement(paths[v])}
                          for v in ("int8-auto", "bottleneck+int8")}
        cut = next(r for r in out["rows"] if r["variant"] == "bottleneck+int8")["macs_removed"]
        out["amdahl"] = amdahl_bound(out["profile"]["int8-auto"], cut)
    return out


def amdahl_bound(profile: Mapping[str, Any], macs_removed: float) -> dict[str, Any]:
    """The most a MAC cut can buy on top of int8: the int8 model's conv kernels are only part of
    its time (the rest, SiLU's QLinearSigmoid/QLinearMul, concat, decode, does not shrink), so
    even conv time falling in proportion to MACs gives 1 / (1 - conv share x cut)."""
    conv = sum(ms for op, ms in profile["per_op_ms"].items() if "Conv" in op)
    share = conv / max(profile["total_ms"], 1e-12)
    return {"conv_time_share": round(share, 4), "macs_removed": macs_removed,
            "best_speedup_vs_int8": round(1 / max(1 - share * macs_removed, 1e-12), 4)}


def run(full: bool = False, only: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    plan = FULL if full else QUICK
    previous = _previous_cases(full) if only else []
    CACHE.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"topic": "int8", "full": full, "machine": machine_info(),
                           "bottleneck": BOTTLENECK, "threads": list(THREADS), "batch": 1,
                           "cases": [], "skipped": []}
    makers = [("detector", detector_case), ("digits", digits_case),
              ("ppocr_det", lambda: ocr_case(plan))]
    for tag, make in makers:
        if only and tag not in only:
            continue
        case = make()
        if case is None:
            out["skipped"].append(f"{tag}: model or its dependencies not available")
            continue
        out["cases"].append(run_case(case, plan, f"{'full' if full else 'quick'}-{tag}"))
        _write(out)
    if only:
        fresh = {c["model"] for c in out["cases"]}
        out["cases"] = [c for c in previous if c["model"] not in fresh] + out["cases"]
    out["targets"] = targets(out)
    out["markdown"] = markdown(out)
    out["wall_s"] = round(time.perf_counter() - started, 1)
    _write(out)
    return out


def targets(out: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets: detector F1 >= 0.95 with auto-exclusion where plain int8 loses it;
    bottleneck + int8 >= 1.3x int8 alone (at the same fidelity) and >= 2x float."""
    result: dict[str, Any] = {}
    for case in out["cases"]:
        rows = {r["variant"]: r for r in case["rows"]}
        key = case["metric"]
        one = lambda r: next(x for x in r["latency"] if x["threads"] == 1)["speedup"]  # noqa: E731
        vs_int8 = next(x for x in case["bottleneck_int8_vs_int8"] if x["threads"] == 1)
        entry = {
            "int8_plain_" + key: rows["int8"][key], "int8_auto_" + key: rows["int8-auto"][key],
            "bottleneck_int8_" + key: rows["bottleneck+int8"][key],
            "bottleneck_int8_vs_int8_1thr": vs_int8["speedup"],
            "bottleneck_int8_vs_float_1thr": one(rows["bottleneck+int8"]),
            "int8_auto_vs_float_1thr": one(rows["int8-auto"]),
            "met_1_3x_vs_int8": vs_int8["speedup"] >= 1.3,
            "met_2x_vs_float": one(rows["bottleneck+int8"]) >= 2.0,
        }
        if key == "f1_vs_original":
            entry["met_auto_f1_0_95"] = rows["int8-auto"][key] >= 0.95
        if "amdahl" in case:
            entry["amdahl_best_vs_int8"] = case["amdahl"]["best_speedup_vs_int8"]
            entry["int8_conv_time_share"] = case["amdahl"]["conv_time_share"]
        result[case["model"]] = entry
    return result


def markdown(out: dict[str, Any]) -> str:
    lines = ["Static int8 (onnxruntime QDQ, per-channel, u8 activations) vs fold-bn + bottleneck "
             "(each model's options in its rows' `passes`); batch 1, A/B interleaved against "
             "float (speedup = float / variant, median):", "",
             "| model | variant | task metric | speedup 1 thr | speedup 2 thr | MACs removed "
             "| file MB | kept in float |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for case in out["cases"]:
        for r in case["rows"]:
            lat = {x["threads"]: x["speedup"] for x in r.get("latency", [])}
            q = r.get("quantize") or {}
            kept = "; ".join(f"{e['block']} ({e['nodes']} nodes)" for e in q.get("excluded", []))
            lines.append(
                f"| {case['model']} | {r['variant']} | {case['metric']} {r[case['metric']]:.4f} "
                f"| {lat.get(1, 1.0):.2f}x | {lat.get(2, 1.0):.2f}x "
                f"| {r.get('macs_removed', 0.0):.1%} | {r['file_bytes'] / 1e6:.2f} | {kept} |")
    lines += ["", "bottleneck + int8 vs int8 alone (auto-excluded), A/B:", "",
              "| model | threads | int8 ms | bottleneck+int8 ms | speedup |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for case in out["cases"]:
        for x in case["bottleneck_int8_vs_int8"]:
            lines.append(f"| {case['model']} | {x['threads']} | {x['a_ms']:.3f} | "
                         f"{x['b_ms']:.3f} | {x['speedup']:.2f}x |")
    bounds = [c for c in out["cases"] if "amdahl" in c]
    if bounds:
        lines += ["", "Why not more: the int8 model's conv kernels are only part of its time "
                  "(onnxruntime profiler, 1 thread), so a MAC cut buys at most "
                  "1 / (1 - conv share x cut):", "",
                  "| model | conv share of int8 time | MACs removed | best possible vs int8 |",
                  "| --- | ---: | ---: | ---: |"]
        for c in bounds:
            a = c["amdahl"]
            lines.append(f"| {c['model']} | {a['conv_time_share']:.0%} | "
                         f"{a['macs_removed']:.1%} | {a['best_speedup_vs_int8']:.2f}x |")
    return "\n".join(lines)


def _previous_cases(full: bool) -> list[dict[str, Any]]:
    """The last run's per-model results in the same mode (--only keeps the other models')."""
    if not RESULTS.exists():
        return []
    previous = json.loads(RESULTS.read_text())
    return previous.get("cases", []) if previous.get("full") == full else []


def _write(out: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--only", nargs="*", choices=["detector", "digits", "ppocr_det"])
    args = parser.parse_args(argv)
    out = run(full=args.full, only=args.only)
    print(out["markdown"])
    print(json.dumps(out["targets"], indent=2))


if __name__ == "__main__":
    main()
