"""Supporting passes and fine-tuning, measured: fold-bn exactness on the zoo, the torch executor
against onnxruntime, fold-bn + bottleneck on ResNet-50, and bottleneck + distillation on the
trained digits model (accuracy on its test split).

    python -m bench.bench_supporting [--full]     # writes bench/results/supporting.json
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.tables import supporting_markdown

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "supporting.json"
TRAINED = ROOT / "models" / "trained"


def _ort(model_or_proto: Any, feeds: dict[str, np.ndarray], optimize: bool = False) -> np.ndarray:
    import onnx_ir as ir

    proto = model_or_proto
    if isinstance(model_or_proto, ir.Model):
        proto = ir.serde.serialize_model(model_or_proto)
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _max_rel(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(ref.astype(np.float64) - got).max() / max(np.abs(ref).max(), 1e-30))


def _zoo_path(name: str, folder: Path) -> Path:
    from models.export import export

    return export(name, folder / f"{name}.onnx")


def _text_image(height: int, width: int) -> np.ndarray:
    """PP-OCR det input with rendered text (random noise gives an all-~0 map; see tests)."""
    from tests.passcheck import text_image

    return text_image(height, width)


def _input(path: Path, shape: tuple[int, ...] | None = None) -> dict[str, np.ndarray]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    value = proto.graph.input[0]
    dims = shape or tuple(d.dim_value for d in value.type.tensor_type.shape.dim)
    return {value.name: np.random.default_rng(0).standard_normal(dims).astype(np.float32)}


def fold_bn_zoo(names: list[str], folder: Path) -> list[dict[str, Any]]:
    """BN count, output change of fold-bn, and onnxruntime's own BN fusion as the float32 floor."""
    import onnx
    from rewriter.passes import get_pass

    from rewriter.io import load

    rows = []
    for name in names:
        path = _zoo_path(name, folder)
        proto = onnx.load(str(path))
        model = load(path)
        fold = get_pass("fold-bn")()
        fold(model)
        feeds = _input(path)
        ref = _ort(proto, feeds)
        rows.append({
            "model": name,
            "bn_nodes": sum(n.op_type == "BatchNormalization" for n in proto.graph.node),
            "folded": fold.report.n_applied,
            "max_rel_error": _max_rel(ref, _ort(model, feeds)),
            "ort_own_fusion_max_rel_error": _max_rel(ref, _ort(proto, feeds, optimize=True)),
        })
    return rows


def executor_parity(names: list[str], folder: Path) -> list[dict[str, Any]]:
    """Torch executor vs onnxruntime (max relative error) on zoo models and PP-OCRv4 det."""
    import torch

    from rewriter.io import load
    from rewriter.torch_exec import to_torch

    rows = []
    targets = [(n, _zoo_path(n, folder), None) for n in names]
    det = _ppocr_det()
    if det is not None:
        targets.append(("ppocrv4_det", det, (1, 3, 320, 320)))
    for name, path, shape in targets:
        feeds = {"x": _text_image(*shape[2:])} if name == "ppocrv4_det" else _input(path, shape)
        ref = _ort(load(path), feeds)
        started = time.perf_counter()
        with torch.no_grad():
            got = to_torch(load(path))(*[torch.from_numpy(v) for v in feeds.values()])
        rows.append({"model": name, "max_rel_error": _max_rel(ref, got.numpy()),
                     "torch_forward_s": round(time.perf_counter() - started, 2)})
    return rows


def _ppocr_det() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "models" / "ch_PP-OCRv4_det_infer.onnx"


def fold_then_bottleneck_resnet50(folder: Path) -> dict[str, Any]:
    """MACs/params of ResNet-50 after fold-bn + bottleneck (data-free svd, ratio 0.5)."""
    from rewriter.pipeline import rewrite

    result = rewrite(str(_zoo_path("resnet50", folder)),
                     ["fold-bn", "bottleneck:ratio=0.5,init=svd"], guard=False)
    r = result.report
    return {
        "passes": r.options["passes"],
        "bn_left": sum(n.op_type == "BatchNormalization" for n in result.model.graph),
        "bottlenecked_convs": r.passes[1].n_applied,
        "macs_before": r.macs_before, "macs_after": r.macs_after,
        "mac_reduction": 1 - r.macs_after / r.macs_before,
    }


def digits_distill(steps: int, variants: list[str]) -> dict[str, Any]:
    """Test accuracy: original, bottleneck at >= 70% MAC cut, then + distillation."""
    from rewriter.pipeline import rewrite

    if not (TRAINED / "digits_cnn.onnx").exists():
        return {"skipped": "models/trained/digits_cnn.onnx missing (python -m models.digits)"}
    calib = dict(np.load(TRAINED / "digits_calib.npz"))
    test = dict(np.load(TRAINED / "digits_test.npz"))

    def accuracy(model: Any) -> float:
        logits = _ort(model, {"input": test["input"]})
        return float(np.mean(np.argmax(logits, axis=1) == test["labels"]))

    rows = []
    for bottleneck in variants:
        row: dict[str, Any] = {"passes": ["fold-bn", bottleneck]}
        started = time.perf_counter()
        plain = rewrite(str(TRAINED / "digits_cnn.onnx"), ["fold-bn", bottleneck], calib=calib)
        row["rewrite_s"] = round(time.perf_counter() - started, 1)
        row["accuracy_original"] = accuracy(plain.original)
        row["accuracy_bottleneck"] = accuracy(plain.model)
        row["mac_reduction"] = 1 - plain.report.macs_after / plain.report.macs_before
        started = time.perf_counter()
        tuned = rewrite(str(TRAINED / "digits_cnn.onnx"), ["fold-bn", bottleneck], calib=calib,
                        distill={"steps": steps, "lr": 1e-3})
        step = tuned.report.passes[-1]
        row["distill"] = {"steps": steps, "lr": 1e-3,
                          "seconds_total": round(time.perf_counter() - started, 1),
                          "loss_before": step.metrics.get("loss_before"),
                          "loss_after": step.metrics.get("loss_after"),
                          "trained_weights": step.n_applied}
        row["accuracy_distilled"] = accuracy(tuned.model)
        row["drop_points_distilled"] = 100 * (row["accuracy_original"] - row["accuracy_distilled"])
        row["target_met"] = row["mac_reduction"] >= 0.7 and row["drop_points_distilled"] <= 0.5
        rows.append(row)
    return {"test_samples": int(len(test["labels"])), "calib_samples": int(len(calib["labels"])),
            "rows": rows}


def run(full: bool = False) -> dict[str, Any]:
    """Quick: small/medium zoo models and one digits setting; full: every model and init."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onexone-bench-supporting-") as tmp:
        folder = Path(tmp)
        bn_models = ["resnet50", "mobilenetv2", "googlenet"] if full else ["mobilenetv2"]
        exec_models = (["convnet", "convnet_gap", "inception3a", "googlenet", "resnet50", "vgg16",
                        "mobilenetv2"] if full else ["convnet", "mobilenetv2"])
        variants = (["bottleneck:target=0.7,init=svd", "bottleneck:target=0.7,init=refit"]
                    if full else ["bottleneck:target=0.7,init=svd"])
        result = {
            "mode": "full" if full else "quick",
            "fold_bn": fold_bn_zoo(bn_models, folder),
            "executor_vs_onnxruntime": executor_parity(exec_models, folder),
            "fold_bn_then_bottleneck_resnet50": _optional(fold_then_bottleneck_resnet50, folder),
            "digits_bottleneck_distill": _optional(digits_distill, 1000 if full else 200, variants),
        }
    result["seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    result["markdown"] = supporting_markdown(result)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _optional(fn: Any, *args: Any) -> Any:
    """Parts that need the bottleneck pass (written separately) report a skip without it."""
    try:
        import rewriter.passes.bottleneck  # noqa: F401
    except ModuleNotFoundError:
        return {"skipped": "rewriter.passes.bottleneck not available"}
    return fn(*args)


if __name__ == "__main__":
    print(json.dumps(run(full="--full" in sys.argv), indent=2))
