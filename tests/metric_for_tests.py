"""A user metric for the tests (`--metric tests/metric_for_tests.py:evaluate`).

Mean of each anchor's best class score of `output0` on fixed seeded images: it falls when the
class branch is weakened. Records every call in `CALLS` (in-process tests read it).
"""

from __future__ import annotations

import onnxruntime as ort

from tests.detector_builder import detector_images

CALLS: list[str] = []


def evaluate(model_path: str) -> dict:
    CALLS.append(model_path)
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    out = session.run(None, {"images": detector_images(8, seed=5)})[0]
    best = out[:, 4:, :].max(axis=1)
    return {"primary": "best_score", "best_score": float(best.mean()),
            "confident": float((best > 0.5).mean())}


def plain(model_path: str) -> float:
    """The same value as a bare number."""
    return evaluate(model_path)["best_score"]
