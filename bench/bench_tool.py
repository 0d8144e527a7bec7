"""Where the tool stands (design §8 items 1, 4 and 5).

1. The textbook table: MACs of the 28x28x256 -> 5x5x32 conv with and without a 16-channel 1x1
   reduction, exactly (160.5M vs 3.2M + 10.0M = 13.25M).
4. The tool itself: wall time and peak memory of our load + save (shape inference, full checker,
   onnxruntime session before the atomic rename) against plain `onnx.load` + `onnx.save`, each
   measured in a fresh process on a zoo model.
5. What users would pick instead: onnxruntime's int8 dynamic quantization
   (`quantize_dynamic`), the bottleneck pass, and bottleneck followed by int8: accuracy on the
   trained digits CNN's test set and interleaved A/B latency, 1 thread.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TRAINED = ROOT / "models" / "trained"
THREADS = 1


# ------------------------------------------------------------------------------ 1. textbook


def _conv(name: str, x: str, y: str, c_in: int, c_out: int, k: int, rng) -> tuple:
    w = numpy_helper.from_array(rng.standard_normal((c_out, c_in, k, k)).astype(np.float32),
                                f"{name}_W")
    node = helper.make_node("Conv", [x, w.name], [y], name=name, pads=[k // 2] * 4)
    return node, w


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "textbook", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(proto)


def textbook_table() -> dict[str, Any]:
    """Our cost model on the two textbook graphs, against the closed-form counts."""
    from rewriter.cost import model_cost
    from rewriter.io import load

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256, 28, 28])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    direct, w = _conv("conv5x5", "x", "y", 256, 32, 5, rng)
    plain = _model([direct], [x], [y], [w])
    reduce, w1 = _conv("reduce1x1", "x", "r", 256, 16, 1, rng)
    conv, w2 = _conv("conv5x5", "r", "y", 16, 32, 5, rng)
    reduced = _model([reduce, conv], [x], [y], [w1, w2])
    rows = []
    expected = {
        "5x5 conv, 32 filters": {"conv5x5": 28 * 28 * 32 * 256 * 25},
        "1x1 (16) then 5x5 (32)": {"reduce1x1": 28 * 28 * 16 * 256,
                                   "conv5x5": 28 * 28 * 32 * 16 * 25},
    }
    for (label, proto), want in zip((("5x5 conv, 32 filters", plain),
                                     ("1x1 (16) then 5x5 (32)", reduced)), expected.values(),
                                    strict=True):
        cost = model_cost(load(proto))
        got = {c.name: c.macs for c in cost.nodes}
        rows.append({"graph": label, "macs": cost.macs, "expected": sum(want.values()),
                     "per_node": got, "exact": got == want})
    return {"rows": rows, "exact": all(r["exact"] for r in rows)}


# ------------------------------------------------------------------------------ 4. the tool

_MEASURE = r"""
import json, sys, time
mode, src, dst = sys.argv[1:4]
import onnx
if mode == "ours":
    import rewriter

def hwm_mb():  # VmHWM is per address space: a fresh exec starts from zero (ru_maxrss does not)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")

base = hwm_mb()
t0 = time.perf_counter()
if mode == "ours":
    rewriter.save(rewriter.load(src), dst)
else:
    onnx.save(onnx.load(src), dst)
wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "peak_rss_mb": hwm_mb(), "baseline_rss_mb": base}))
"""


def load_save_cost(model_path: Path, repeats: int = 3) -> dict[str, Any]:
    """Best-of-`repeats` wall time and peak RSS (fresh process each) for ours vs plain onnx."""
    size_mb = round(model_path.stat().st_size / 2**20, 1)
    out: dict[str, Any] = {"model": model_path.name, "size_mb": size_mb}
    with tempfile.TemporaryDirectory(prefix="onexone-bench-") as tmp:
        for mode in ("onnx", "ours"):
            runs = []
            for i in range(repeats):
                dst = Path(tmp) / f"{mode}-{i}.onnx"
                cmd = [sys.executable, "-c", _MEASURE, mode, str(model_path), str(dst)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            best = min(runs, key=lambda r: r["wall_s"])
            out[mode] = {
                "wall_s": round(best["wall_s"], 3),
                "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
                "extra_rss_mb": round(
                    max(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in runs), 1),
            }
    out["time_ratio"] = round(out["ours"]["wall_s"] / max(out["onnx"]["wall_s"], 1e-9), 2)
    return out


# ------------------------------------------------------------------------------ 5. alternatives


def int8(model_path: Path, out_path: Path) -> Path:
    """onnxruntime's dynamic int8 quantization, as a user would call it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(model_path), str(out_path), weight_type=QuantType.QInt8)
    return out_path


def alternatives(full: bool) -> dict[str, Any]:
    """Accuracy and latency of int8, bottleneck and bottleneck+int8 on the digits CNN."""
    from rewriter.passes import available

    import rewriter
    from rewriter.bench import ab_latency
    from rewriter.runtime import make_session

    model_path = TRAINED / "digits_cnn.onnx"
    if not model_path.exists():
        return {"skipped": f"{model_path} missing (models helper builds it)"}
    test = np.load(TRAINED / "digits_test.npz")
    calib = TRAINED / "digits_calib.npz"
    x, labels = test["input"], test["labels"]
    variants: dict[str, Path] = {"original": model_path}
    notes = []
    with tempfile.TemporaryDirectory(prefix="onexone-alt-") as tmp:
        tmpdir = Path(tmp)
        variants["int8 dynamic"] = int8(model_path, tmpdir / "int8.onnx")
        if "bottleneck" in available():
            ratios = [0.5, 0.25] if full else [0.5]
            for ratio in ratios:
                result = rewriter.rewrite(model_path, [f"bottleneck:ratio={ratio}"],
                                          calib=str(calib))
                path = rewriter.save(result.model, tmpdir / f"bneck{ratio}.onnx")
                variants[f"bottleneck r={ratio}"] = path
                try:
                    quantized = int8(path, tmpdir / f"bneck{ratio}-int8.onnx")
                    variants[f"bottleneck r={ratio} + int8"] = quantized
                except Exception as exc:  # record what a user would hit, keep the rest
                    notes.append(f"quantize_dynamic failed on bottleneck r={ratio}: "
                                 f"{' '.join(str(exc).split())[:200]}")
        else:
            notes.append("bottleneck pass not importable: only int8 measured")
        original = make_session(rewriter.load(model_path), threads=THREADS)
        reference = _accuracy(original, x, labels)
        rows = []
        for name, path in variants.items():
            session = make_session(rewriter.load(path), threads=THREADS)
            acc = _accuracy(session, x, labels)
            feeds = {original.get_inputs()[0].name: x[:1]}
            ab = ab_latency(original, session, feeds, min_time_s=1.5 if full else 0.5)
            rows.append({
                "variant": name,
                "accuracy": round(acc, 4),
                "accuracy_drop": round(reference - acc, 4),
                "file_kb": round(path.stat().st_size / 1024, 1),
                "latency_ms": ab["b_ms"]["median"],
                "speedup": ab["speedup"],
            })
    return {"model": model_path.name, "test_samples": int(len(x)), "threads": THREADS,
            "batch": 1, "rows": rows, "notes": notes}


def _accuracy(session, x: np.ndarray, labels: np.ndarray) -> float:
    name = session.get_inputs()[0].name
    fixed = session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) else 256
    preds = [np.argmax(session.run(None, {name: x[i:i + step]})[0], axis=1)
             for i in range(0, len(x), step)]
    return float(np.mean(np.concatenate(preds) == labels))


# ------------------------------------------------------------------------------ entry point


def run(full: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {"textbook": textbook_table()}
    zoo_names = ["resnet50", "vgg16"] if full else ["resnet50"]
    result["load_save"] = []
    try:
        from models.export import export

        with tempfile.TemporaryDirectory(prefix="onexone-zoo-") as tmp:
            for name in zoo_names:
                path = export(name, Path(tmp) / f"{name}.onnx")
                result["load_save"].append(load_save_cost(path, repeats=3 if full else 2))
    except ImportError as exc:
        result["load_save_skipped"] = f"zoo export needs torch ({exc})"
    result["alternatives"] = alternatives(full)
    result["markdown"] = markdown(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tool.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = ["Textbook MACs (cost model vs closed form):", "",
             "| graph | MACs | expected | exact |", "| --- | ---: | ---: | --- |"]
    for r in result["textbook"]["rows"]:
        lines.append(f"| {r['graph']} | {r['macs']:,} | {r['expected']:,} | {r['exact']} |")
    if result.get("load_save"):
        lines += ["", "Load + save (best wall time, peak RSS; fresh process each):", "",
                  "| model | MB | onnx.load+save s | ours s | ratio | onnx peak MB "
                  "| ours peak MB |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in result["load_save"]:
            lines.append(f"| {r['model']} | {r['size_mb']} | {r['onnx']['wall_s']} | "
                         f"{r['ours']['wall_s']} | {r['time_ratio']}x | "
                         f"{r['onnx']['peak_rss_mb']} | {r['ours']['peak_rss_mb']} |")
    alt = result.get("alternatives", {})
    if alt.get("rows"):
        lines += ["", f"Alternatives on {alt['model']} ({alt['test_samples']} test images, "
                  f"batch {alt['batch']}, {alt['threads']} thread):", "",
                  "| variant | accuracy | drop | file KB | latency ms | speedup (p10-p90) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in alt["rows"]:
            s = r["speedup"]
            lines.append(f"| {r['variant']} | {r['accuracy']:.2%} | {r['accuracy_drop']:+.2%} | "
                         f"{r['file_kb']} | {r['latency_ms']:.3f} | {s['median']:.2f}x "
                         f"({s['p10']:.2f}-{s['p90']:.2f}) |")
        lines += [f"\n- note: {n}" for n in alt.get("notes", [])]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run("--full" in sys.argv)["markdown"])
