"""The user-metric examples in examples/ load by path and score the shipped models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import ROOT

TRAINED = ROOT / "models" / "trained"


def load_example(name: str):
    path = Path(ROOT) / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_classify_metric_reports_the_shipped_accuracy():
    import json

    value = load_example("classify_metric").evaluate(str(TRAINED / "digits_cnn.onnx"))
    expected = json.loads((TRAINED / "digits_cnn.json").read_text())["accuracy"]
    assert isinstance(value, float) and value == pytest.approx(expected)


@pytest.mark.slow
def test_detector_metric_names_its_primary_and_agrees_with_itself():
    import json

    values = load_example("detector_metric").evaluate(str(TRAINED / "detector.onnx"))
    meta = json.loads((TRAINED / "detector.json").read_text())
    assert values["primary"] == "map50"
    assert values["map50"] == pytest.approx(meta["test"]["map50"], abs=1e-6)
    assert values["f1_vs_original"] == 1.0
    assert values["images"] == meta["data"]["test"]["images"]
