"""Big models: peak memory and wall time of `rewriter.load` + `rewriter.save` on an external-data
model, against plain `onnx.load` + `onnx.save` of the same file.

Each measurement runs in a fresh subprocess and reads its peak RSS (`ru_maxrss`), so the numbers
are the whole cost of one load+save, imports included. Quick mode uses a ~0.5 GB model, full mode
one over the 2 GB protobuf limit (about 2.3 GB of weights, written once to a temp folder).

    python -m bench.bench_bigmodel [--full]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "bigmodel.json"
GIB = 2**30


def build_big_model(folder: Path, *, layers: int, channels: int, seed: int = 0) -> Path:
    """A chain of 1x1 Convs (channels x channels) with weights in `big.onnx.data`.

    Weights are written one layer at a time straight to the data file, so building a 2.3 GB
    model never holds more than one layer in memory. Input `x` has a symbolic batch dim.
    """
    folder.mkdir(parents=True, exist_ok=True)
    data_path = folder / "big.onnx.data"
    rng = np.random.default_rng(seed)
    inits, nodes, offset = [], [], 0
    scale = np.float32(1.0 / np.sqrt(channels))
    with open(data_path, "wb") as data:
        for i in range(layers):
            weight = rng.standard_normal((channels, channels), dtype=np.float32) * scale
            data.write(weight.tobytes())
            tensor = TensorProto(name=f"W{i}", data_type=TensorProto.FLOAT,
                                 dims=[channels, channels, 1, 1],
                                 data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_path.name), ("offset", str(offset)),
                               ("length", str(weight.nbytes))):
                tensor.external_data.add(key=key, value=value)
            offset += weight.nbytes
            inits.append(tensor)
            src = "x" if i == 0 else f"h{i - 1}"
            nodes.append(helper.make_node("Conv", [src, f"W{i}"], [f"c{i}"], name=f"conv{i}"))
            nodes.append(helper.make_node("Relu", [f"c{i}"], [f"h{i}" if i < layers - 1 else "y"],
                                          name=f"relu{i}"))
            del weight
    graph = helper.make_graph(
        nodes, "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", channels, 2, 2])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "big.onnx"
    path.write_bytes(model.SerializeToString())
    return path


_WORKER = r"""
import json, resource, sys, time
mode, src, dst = sys.argv[1:4]
import onnx, onnx_ir, onnxruntime, numpy  # imports are not the model: measured separately
import rewriter
from rewriter.shapes import infer_shapes
import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
if mode == "onexone":
    model = rewriter.load(src)
    t_load = time.perf_counter() - t0
    shapes_ok = infer_shapes(model) is None and all(
        n.outputs[0].shape is not None for n in model.graph)
    rewriter.save(model, dst)
else:
    model = onnx.load(src)
    t_load = time.perf_counter() - t0
    shapes_ok = None
    onnx.save(model, dst, save_as_external_data=True, location=dst.rsplit("/", 1)[-1] + ".data")
wall = time.perf_counter() - t0
print(json.dumps({"mode": mode, "wall_s": round(wall, 2), "load_s": round(t_load, 2),
                  "import_rss_mb": round(import_rss, 1),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                       1),
                  "shape_inference_ok": shapes_ok}))
"""


def measure(mode: str, source: Path, out: Path, timeout: float = 1800) -> dict[str, Any]:
    """Peak RSS and wall time of one load+save in a fresh process (`onexone` or `onnx`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-c", _WORKER, mode, str(source), str(out)],
                            capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{mode} load+save failed: {result.stderr.strip()[-500:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(full: bool = False) -> dict[str, Any]:
    layers, channels = (9, 8192) if full else (8, 4096)
    free = shutil.disk_usage(tempfile.gettempdir()).free
    weights = layers * channels * channels * 4
    if free < 3.5 * weights:
        result = {"skipped": f"needs {3.5 * weights / GIB:.1f} GiB free in /tmp, "
                             f"{free / GIB:.1f} GiB available"}
        _write(result)
        return result
    with tempfile.TemporaryDirectory(prefix="onexone-bigbench-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        source = build_big_model(folder / "in", layers=layers, channels=channels)
        build_s = time.perf_counter() - started
        runs = {mode: measure(mode, source, folder / mode / "out.onnx")
                for mode in ("onexone", "onnx")}
    weights_mb = weights / 2**20
    result = {
        "mode": "full" if full else "quick",
        "model": {"layers": layers, "channels": channels, "weights_mb": round(weights_mb, 1),
                  "over_2gb": weights > 2**31, "build_s": round(build_s, 1)},
        "onexone": runs["onexone"],
        "onnx": runs["onnx"],
        "rss_over_weights": {m: round((r["peak_rss_mb"] - r["import_rss_mb"]) / weights_mb, 2)
                             for m, r in runs.items()},
        "note": "peak RSS of a fresh process doing load+save; rss_over_weights subtracts the "
                "RSS after imports and divides by the weight bytes (2.0 would be two copies); "
                "onexone also "
                "runs shape inference, onnx.checker and an onnxruntime session on the temp file "
                "before the rename (the session is skipped above 4 GiB on disk)",
    }
    result["markdown"] = _markdown(result)
    _write(result)
    return result


def _markdown(result: dict[str, Any]) -> str:
    model = result["model"]
    rows = [f"Big model load+save ({model['layers']} x Conv1x1 {model['channels']}ch, "
            f"{model['weights_mb']:.0f} MB of weights in external data)", "",
            "| tool | wall s | peak RSS MB | (peak - imports) / weights |", "|---|---:|---:|---:|"]
    for mode in ("onexone", "onnx"):
        r = result[mode]
        rows.append(f"| {mode} | {r['wall_s']} | {r['peak_rss_mb']} | "
                    f"{result['rss_over_weights'][mode]} |")
    return "\n".join(rows)


def _write(result: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    print(json.dumps(run(full=parser.parse_args().full), indent=2))
