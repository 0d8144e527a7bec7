"""A user metric for ``--metric``: top-1 accuracy of the digits CNN on its shipped test split.

``evaluate(model_path)`` returns a plain float (higher is better); the tool treats it as the
primary value. Replace the data and preprocessing with your own validation set.

    rewrite models/trained/digits_cnn.onnx --pass fold-bn,bottleneck \\
        --metric examples/classify_metric.py:evaluate ...
    python examples/classify_metric.py MODEL.onnx
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

TEST_SET = Path(__file__).resolve().parents[1] / "models" / "trained" / "digits_test.npz"


@functools.cache
def _test_set() -> tuple[np.ndarray, np.ndarray]:
    with np.load(TEST_SET) as data:
        return data["input"], data["labels"]


def evaluate(model_path: str) -> float:
    """Share of test digits whose largest logit is the true label."""
    images, labels = _test_set()
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    batch = session.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) and batch > 0 else len(images)
    logits = np.concatenate([session.run(None, {name: images[i : i + step]})[0]
                             for i in range(0, len(images), step)])
    return float((logits.argmax(1) == labels).mean())


if __name__ == "__main__":
    default = str(TEST_SET.with_name("digits_cnn.onnx"))
    print(evaluate(sys.argv[1] if len(sys.argv) > 1 else default))
