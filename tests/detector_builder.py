"""A small synthetic detector with the YOLOv8 export layout, for fidelity tests without torch.

`images [N, 3, 32, 32]` -> stem conv -> a box branch (4 rows of pixel coordinates in the tens to
hundreds) and a class branch (3x3 conv `cls_conv`, 1x1 `cls_head`, Sigmoid: 10 score rows),
concatenated on axis 1 and flattened to `output0 [N, 4 + 10, 256]`. Seeded random weights, so
scores are not meaningful detections, only the right shapes and scales.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.builders import make_model, save

CLASSES = 10
ANCHORS = 16 * 16


def synthetic_detector(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int, scale: float = 0.3) -> str:
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    inits: list = []
    nodes = [
        helper.make_node("Conv", ["images", weight("stem_w", 16, 3, 3, 3), weight("stem_b", 16)],
                         ["s"], name="stem", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["s"], ["f"], name="stem_relu"),
        helper.make_node("Conv", ["f", weight("box_w", 4, 16, 1, 1), weight("box_b", 4)],
                         ["bl"], name="box_head"),
        helper.make_node("Sigmoid", ["bl"], ["bs"], name="box_sigmoid"),
        helper.make_node("Mul", ["bs", const("box_scale", np.array([320, 320, 120, 120])
                                              .reshape(1, 4, 1, 1))], ["box"], name="box_px"),
        helper.make_node("Conv", ["f", weight("cls_w", 16, 16, 3, 3, scale=0.2),
                                  weight("cls_b", 16)], ["c"], name="cls_conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["cr"], name="cls_relu"),
        helper.make_node("Conv", ["cr", weight("head_w", CLASSES, 16, 1, 1, scale=0.8),
                                  const("head_b", np.full(CLASSES, -1.5))], ["cl"],
                         name="cls_head"),
        helper.make_node("Sigmoid", ["cl"], ["cls"], name="cls_sigmoid"),
        helper.make_node("Concat", ["box", "cls"], ["cat"], name="concat", axis=1),
        helper.make_node("Reshape", ["cat", _int64(inits, "flat", [0, 4 + CLASSES, -1])],
                         ["output0"], name="flatten"),
    ]
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 32, 32])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["N", 4 + CLASSES, ANCHORS])
    return save(make_model(nodes, [x], [y], inits), path)


def _int64(inits: list, name: str, value: list[int]) -> str:
    inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), name))
    return name


def detector_images(n: int = 40, seed: int = 0) -> np.ndarray:
    """Seeded images in [0, 1] with a few bright squares (something for the scores to see)."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 0.3, size=(n, 3, 32, 32)).astype(np.float32)
    for i in range(n):
        for _ in range(3):
            y, x = rng.integers(0, 24, size=2)
            images[i, :, y : y + 8, x : x + 8] += rng.uniform(0.3, 0.7, size=(3, 1, 1))
    return np.clip(images, 0, 1)
