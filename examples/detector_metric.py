"""A user metric for ``--metric``: mAP@0.5 of a detector on the shipped digit-detection test set.

The tool calls ``evaluate(model_path)`` on the original and on every rewritten model it must
judge; the function runs its own pre- and post-processing (here: none before, YOLOv8 decode +
NMS after) through onnxruntime and returns a dict whose ``"primary"`` entry names the value the
tool gates on (higher is better). ``f1_vs_original`` compares the detections with those of the
shipped original, so it reads 1.0 when the rewrite finds exactly the same boxes.

    rewrite models/trained/detector.onnx --pass fold-bn,bottleneck \\
        --metric examples/detector_metric.py:evaluate ...
    python examples/detector_metric.py MODEL.onnx      # print the values for one model
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rewriter.detection import decode, detection_f1, load_ground_truth, map50

TRAINED = Path(__file__).resolve().parents[1] / "models" / "trained"
ORIGINAL = TRAINED / "detector.onnx"
TEST_SET = TRAINED / "detector_test.npz"


def run_detector(model_path: str | Path, images: np.ndarray) -> np.ndarray:
    """``output0`` for all images, in chunks when the model's batch dimension is fixed."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    batch = session.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) and batch > 0 else len(images)
    chunks = [session.run(None, {name: images[i : i + step]})[0]
              for i in range(0, len(images), step)]
    return np.concatenate(chunks)


@functools.cache
def _test_set() -> tuple[np.ndarray, list[np.ndarray]]:
    with np.load(TEST_SET) as data:
        images = data["images"]
        return images, load_ground_truth({"images": images, "gt": data["gt"]})


@functools.cache
def _original_detections() -> list[np.ndarray]:
    return decode(run_detector(ORIGINAL, _test_set()[0]))


def evaluate(model_path: str) -> dict:
    """mAP@0.5 against ground truth (primary) and detection F1 against the original model."""
    images, truth = _test_set()
    detections = decode(run_detector(model_path, images))
    return {
        "primary": "map50",
        "map50": map50(detections, truth),
        "f1_vs_original": detection_f1(_original_detections(), detections),
        "detections_per_image": float(np.mean([len(d) for d in detections])),
        "images": len(images),
    }


if __name__ == "__main__":
    print(json.dumps(evaluate(sys.argv[1] if len(sys.argv) > 1 else str(ORIGINAL)), indent=2))
