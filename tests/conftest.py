"""Shared fixtures: small synthetic models, zoo exports cached per session, shipped models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "models" / "trained"


def ort_run(path_or_bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of a model in a plain onnxruntime CPU session (no graph optimisation)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def rapidocr_model(kind: str) -> Path:
    """Path of a PP-OCR model shipped in the rapidocr-onnxruntime package (det, rec, cls)."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        pytest.skip("rapidocr-onnxruntime is not installed (it is in the [dev] extra)")
    folder = Path(spec.origin).parent / "models"
    names = {"det": "ch_PP-OCRv4_det_infer.onnx", "rec": "ch_PP-OCRv4_rec_infer.onnx",
             "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx"}
    return folder / names[kind]


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory) -> Path:
    """Folder where zoo models are exported once per test session."""
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="session")
def zoo(zoo_dir):
    """`zoo(name, opset=17)` -> path of the exported zoo model (exported once, cached)."""
    pytest.importorskip("torch")
    from models.export import export

    cache: dict[tuple[str, int], Path] = {}

    def get(name: str, opset: int = 17) -> Path:
        key = (name, opset)
        if key not in cache:
            cache[key] = export(name, zoo_dir / f"{name}-{opset}.onnx", opset=opset)
        return cache[key]

    return get
