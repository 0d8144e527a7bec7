"""Task fidelity on the trained YOLOv8-style detector (`models/trained/detector.onnx`).

The issue's acceptance checks on real trained weights: the automatic groups are the true 4 + 10
split; a rewrite that flips >= 5% of thresholded score decisions fails `--min-cosine 0.99` and
the default target=auto criterion while the whole-tensor cosine measured in the same test would
pass; the user's metric is called once per evaluated model and its drop gates with exit 3;
`compare` of the model with itself is exact.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import rewriter
import tests.passes_for_tests  # noqa: F401  (test-perturb)
from rewriter import runtime
from rewriter.calibration import CalibrationSet
from rewriter.cli import main
from rewriter.context import PassContext
from rewriter.fidelity import compare_arrays, judge_candidate
from rewriter.groups import find_groups
from rewriter.io import load
from tests.conftest import ROOT, TRAINED

DETECTOR = TRAINED / "detector.onnx"
CALIB = TRAINED / "detector_calib.npz"
METRIC = ROOT / "examples" / "detector_metric.py"
pytestmark = pytest.mark.slow  # the trained detector ships in models/trained
#: Shrinks the class branch's conv weights by 3%: boxes exact, the score group's cosine still
#: ~0.998, yet ~20% of thresholded decisions flip and mAP@0.5 drops ~5 points.
WEAKEN_CLASSES = "test-perturb:eps=-0.03,only=cls"


def run(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    with np.load(CALIB) as data:
        return {"images": data["images"]}


@pytest.fixture(scope="module")
def weakened(tmp_path_factory):
    path = tmp_path_factory.mktemp("weak") / "weak.onnx"
    assert run(DETECTOR, "--pass", WEAKEN_CLASSES, "-o", path) == 0
    return path


def test_automatic_groups_are_the_true_box_and_class_split(images):
    reference = runtime.run_all(load(DETECTOR), images)
    groups = find_groups(reference)
    assert [(g.output, g.axis, g.start, g.stop, g.kind) for g in groups] == [
        ("output0", 1, 0, 4, "value"),
        ("output0", 1, 4, 14, "score"),
    ]


def test_flipping_rewrite_fails_min_cosine_and_auto_while_whole_tensor_passes(
    images, weakened, tmp_path
):
    original, candidate = load(DETECTOR), load(weakened)
    reference = runtime.run_all(original, images)
    got = runtime.run_all(candidate, images)
    whole = compare_arrays(reference["output0"], got["output0"])["cosine"]
    assert whole >= 0.99  # the whole-tensor cosine would have passed --min-cosine 0.99
    context = PassContext(holdout=CalibrationSet(images))
    context.groups = find_groups(reference)
    verdict = judge_candidate(candidate, reference, context, min_cosine=0.99)
    assert not verdict.ok  # the default target=auto criterion rejects it

    report = tmp_path / "r.json"
    assert run("compare", DETECTOR, weakened, "--calib", CALIB, "--min-cosine", "0.99",
               "--report", report) == 3
    fid = json.loads(report.read_text())["fidelity"]
    assert max(fid["flip@0.25"], fid["flip@0.5"]) >= 0.05
    assert fid["whole_tensor"]["outputs"]["output0"]["cosine"] == pytest.approx(whole, abs=1e-6)
    assert fid["worst"]["group"] == "output0:score"


def test_detector_metric_drop_gates_with_exit_3(tmp_path):
    report = tmp_path / "r.json"
    code = run(DETECTOR, "--pass", WEAKEN_CLASSES, "--calib", CALIB, "--metric",
               f"{METRIC}:evaluate", "--max-drop", "0.01", "--report", report, "--dry-run")
    data = json.loads(report.read_text())
    metric = data["metric"]
    assert metric["calls"] == 2 and metric["primary"] == "map50"  # original once, rewritten once
    assert metric["drop"] > 0.01 and code == 3
    gate = next(g for g in data["gates"] if g["name"] == "max-drop")
    assert not gate["passed"] and "map50" in gate["detail"]


def test_compare_with_itself_is_exact(tmp_path):
    report = tmp_path / "c.json"
    assert run("compare", DETECTOR, DETECTOR, "--calib", CALIB, "--min-cosine", "1",
               "--max-flip", "0", "--report", report) == 0
    fid = json.loads(report.read_text())["fidelity"]
    assert fid["task_error"] == 0.0 and fid["cosine"] == 1.0
    assert fid["flip@0.25"] == 0.0 and fid["flip@0.5"] == 0.0


def test_api_run_reports_groups_and_evidence():
    result = rewriter.rewrite(DETECTOR, ["test-identity"], calib=CALIB)
    fid = result.report.fidelity
    assert result.report.options["groups"] == "output0:value=0-3/value+score=4-13/score"
    assert fid["samples"] == result.holdout.n and fid["task_error"] == 0.0
