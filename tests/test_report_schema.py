"""The JSON report validates against docs/report-schema.json, with and without optional parts."""

from __future__ import annotations

import json

import numpy as np
import pytest

import rewriter
from rewriter.bench import benchmark_models
from rewriter.gates import evaluate_gates
from rewriter.report import SCHEMA_VERSION, RunReport
from tests.conftest import ROOT
from tests.test_cli import classifier

jsonschema = pytest.importorskip("jsonschema")
SCHEMA = json.loads((ROOT / "docs" / "report-schema.json").read_text())


def validate(data: dict) -> None:
    jsonschema.Draft202012Validator(SCHEMA).validate(data)


def test_schema_is_valid_and_matches_the_code_version():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    major, minor = SCHEMA_VERSION.split(".")
    assert major == "2" and minor.isdigit()


def test_full_report_validates(tmp_path):
    import tests.passes_for_tests  # noqa: F401

    model = classifier(tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((12, 3, 12, 12)) + rng.normal(0, 2, (12, 3, 1, 1))).astype(np.float32)
    calib = {"x": x, "labels": np.arange(12) % 5}
    result = rewriter.rewrite(model, ["test-perturb:eps=0.01", "test-identity"], calib=calib)
    report = result.report
    report.latency = benchmark_models(result.original, result.model, {}, batches=[1, 2],
                                      data=result.holdout, repeats=3)
    report.gates = evaluate_gates(report, max_drop=0.1, min_cosine=0.9, min_speedup=5.0)
    data = json.loads(report.to_json())
    validate(data)
    assert data["fidelity"]["outputs"]["logits"]["accuracy_before"] is not None
    assert len(data["latency"]["batches"]) == 2


def test_minimal_report_validates_and_broken_ones_do_not():
    data = RunReport(model=None).to_dict()
    validate(data)
    for key, bad in (("macs_before", 1.5), ("schema_version", "3.0"), ("gates", [{"name": "x"}])):
        broken = dict(data, **{key: bad})
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)
    missing = dict(data)
    del missing["fidelity"]
    with pytest.raises(jsonschema.ValidationError):
        validate(missing)


def test_identical_outputs_infinite_sqnr_is_null_and_valid(tmp_path):
    import tests.passes_for_tests  # noqa: F401

    model = classifier(tmp_path / "m.onnx")
    result = rewriter.rewrite(model, ["test-identity"], calib="random")
    data = json.loads(result.report.to_json())
    validate(data)
    assert data["fidelity"]["sqnr_db"] is None and data["fidelity"]["cosine"] == 1.0


def test_detector_report_with_groups_and_metric_validates(tmp_path):
    import tests.passes_for_tests  # noqa: F401
    from tests.detector_builder import detector_images, synthetic_detector

    model = synthetic_detector(tmp_path / "det.onnx")
    result = rewriter.rewrite(model, ["test-perturb:eps=-0.1,only=cls_head"],
                              calib={"images": detector_images(24)},
                              metric="tests.metric_for_tests:evaluate")
    report = result.report
    report.gates = evaluate_gates(report, max_drop=0.01, min_cosine=0.99)
    data = json.loads(report.to_json())
    validate(data)
    assert set(data["fidelity"]["groups"]) == {"output0:value", "output0:score"}
    assert data["metric"]["calls"] == 2
    assert {g["name"] for g in data["gates"]} == {"max-drop", "min-cosine", "max-flip"}
