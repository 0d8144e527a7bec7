"""Task fidelity through runs: groups on a detector layout, flips that gates catch while the
whole-tensor cosine passes, the user's metric, evidence warnings, and `rewrite compare`.

Uses a synthetic `[N, 4 + 10, A]` detector (tests/detector_builder.py); the trained detector's
versions of these checks live in test_detector_fidelity.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import rewriter
import tests.metric_for_tests as metric_module
import tests.passes_for_tests  # noqa: F401  (test-perturb, test-identity)
from rewriter import runtime
from rewriter.cli import main
from rewriter.config import config_to_flags
from rewriter.context import PassContext
from rewriter.fidelity import judge_candidate, task_error
from rewriter.io import load
from tests.conftest import ROOT
from tests.detector_builder import detector_images, synthetic_detector

#: Weakens only the class head: scores flip, boxes stay exact.
FLIPPING = "test-perturb:eps=-0.1,only=cls_head"
METRIC = "tests/metric_for_tests.py:evaluate"


@pytest.fixture
def detector(tmp_path):
    return synthetic_detector(tmp_path / "det.onnx")


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, images=detector_images(48))
    return path


def run(*args) -> int:
    return main([str(a) for a in args])


def test_run_finds_box_and_score_groups(detector, calib):
    result = rewriter.rewrite(detector, ["test-identity"], calib=calib)
    assert result.report.options["groups"] == "output0:value=0-3/value+score=4-13/score"
    fid = result.report.fidelity
    assert list(fid["groups"]) == ["output0:value", "output0:score"]
    assert fid["task_error"] == 0.0 and fid["samples"] == 12


def test_flips_fail_min_cosine_gate_while_whole_tensor_cosine_passes(detector, calib, tmp_path):
    report = tmp_path / "r.json"
    md = tmp_path / "r.md"
    code = run(detector, "--pass", FLIPPING, "--calib", calib, "--min-cosine", "0.99",
               "--report", report, "--report", md, "--dry-run")
    assert code == 3
    data = json.loads(report.read_text())
    fid = data["fidelity"]
    assert fid["whole_tensor"]["outputs"]["output0"]["cosine"] > 0.9999  # would have passed
    assert fid["worst"]["group"] == "output0:score" and fid["flip@0.5"] >= 0.05
    gates = {g["name"]: g for g in data["gates"]}
    assert not gates["max-flip"]["passed"] and "output0:score" in gates["max-flip"]["detail"]
    text = md.read_text()
    assert "worst group output0:score" in text and "group output0:value (rows 0-3" in text
    assert "whole" not in text.split("## pass")[0].lower()  # no whole-tensor headline


def test_default_auto_criterion_rejects_flips_the_whole_tensor_accepts(detector):
    images = {"images": detector_images(32, seed=1)}
    original = load(detector)
    result = rewriter.rewrite(detector, [FLIPPING])
    reference = runtime.run_all(original, images)
    got = runtime.run_all(result.model, images)
    whole = rewriter.fidelity.compare_arrays(reference["output0"], got["output0"])["cosine"]
    assert whole >= 0.99  # a whole-tensor criterion (the old target=auto) would accept it
    context = PassContext(holdout=rewriter.calibration.CalibrationSet(images))
    verdict = judge_candidate(result.model, reference, context, min_cosine=0.99)
    assert not verdict.ok and verdict.error == pytest.approx(task_error(reference, got))
    assert verdict.error > 0.01


def test_given_groups_flag_and_config(detector, calib, tmp_path):
    report = tmp_path / "r.json"
    assert run(detector, "--pass", "test-identity", "--calib", calib, "--groups",
               "output0:box=0-3+cls=4-13", "--report", report, "--dry-run") == 0
    groups = json.loads(report.read_text())["fidelity"]["groups"]
    assert list(groups) == ["output0:box", "output0:cls"]
    assert groups["output0:cls"]["kind"] == "score" and groups["output0:box"]["kind"] == "value"
    flags = config_to_flags({"groups": {"output0": "box=0-3+cls=4-13"},
                             "metric": {"function": "m.py:f"}}, tmp_path, "cfg")
    assert flags["groups"] == ["output0:box=0-3+cls=4-13"]
    assert flags["metric"] == f"{tmp_path / 'm.py'}:f"
    assert config_to_flags({"groups": "a:x=0-1"}, tmp_path, "cfg")["groups"] == ["a:x=0-1"]
    assert run(detector, "--pass", "test-identity", "--calib", calib, "--groups",
               "output0:box=0-3|cls=4-13") == 2
    assert run(detector, "--pass", "test-identity", "--calib", calib, "--groups",
               "nope:x=0-1") == 2


def test_user_metric_called_once_per_model_and_reported(detector, calib):
    metric_module.CALLS.clear()
    result = rewriter.rewrite(detector, [FLIPPING], calib=calib,
                              metric="tests.metric_for_tests:evaluate")
    metric = result.report.metric
    assert len(metric_module.CALLS) == 2 and metric["calls"] == 2  # original, then rewritten
    assert metric["primary"] == "best_score" and metric["drop"] == pytest.approx(
        metric["before"] - metric["after"]) and metric["drop"] > 0
    assert set(metric["values_after"]) == {"best_score", "confident"}


def test_user_metric_drop_gates_with_exit_3(detector, calib, tmp_path):
    report = tmp_path / "r.json"
    out = tmp_path / "out.onnx"
    code = run(detector, "--pass", FLIPPING, "--calib", calib, "--metric",
               ROOT / METRIC, "--max-drop", "0.001", "--report", report, "-o", out)
    assert code == 3 and not out.exists()
    data = json.loads(report.read_text())
    gate = next(g for g in data["gates"] if g["name"] == "max-drop")
    assert not gate["passed"] and "best_score" in gate["detail"]
    assert gate["value"] == pytest.approx(data["metric"]["drop"])
    assert run(detector, "--pass", "test-identity", "--calib", calib, "--metric",
               "tests.metric_for_tests:plain", "--max-drop", "0", "--dry-run") == 0


def test_bad_metric_specs_fail_before_work(detector, calib, capsys):
    for spec, code in (("nomodule_xyz:f", 2), ("tests.metric_for_tests:missing", 2),
                       ("no-colon", 2), ("missing/file.py:f", 2)):
        assert run(detector, "--pass", "test-identity", "--calib", calib, "--metric", spec) == code
        assert "--metric" in capsys.readouterr().err


def test_few_and_duplicate_samples_warn(detector, tmp_path):
    two = detector_images(2, seed=3)
    path = tmp_path / "dups.npz"
    np.savez(path, images=np.concatenate([two] * 20))
    result = rewriter.rewrite(detector, ["test-identity"], calib=path)
    warnings = " ".join(result.report.warnings)
    assert "only 10 samples" in warnings and "only 2 are distinct" in warnings


def test_target_auto_refuses_few_samples_unless_lowered(tmp_path, calib, capsys):
    detector = synthetic_detector(tmp_path / "det.onnx")
    spec = "bottleneck:target=auto,round=4,auto-steps=2,sensitivity=false"
    assert run(detector, "--pass", spec, "--calib", calib, "--dry-run") == 1
    err = capsys.readouterr().err
    assert "fewer than the minimum 16" in err and "--min-samples" in err
    report = tmp_path / "r.json"
    assert run(detector, "--pass", spec, "--calib", calib, "--min-samples", "4", "--dry-run",
               "--report", report) == 0
    fid = json.loads(report.read_text())["fidelity"]
    assert fid["split"] == "report" and fid["samples"] == 12  # never seen by the bisection


def test_compare_with_itself_is_exact(detector, calib, tmp_path):
    report = tmp_path / "c.json"
    code = run("compare", detector, detector, "--calib", calib, "--min-cosine", "1.0",
               "--metric", METRIC, "--max-drop", "0", "--report", report)
    assert code == 0
    data = json.loads(report.read_text())
    fid = data["fidelity"]
    assert fid["task_error"] == 0.0 and fid["cosine"] == 1.0 and fid["samples"] == 48
    assert all(g["rel_l2"] == 0.0 for g in fid["groups"].values())
    assert data["metric"]["drop"] == 0.0 and data["metric"]["calls"] == 2
    assert all(g["passed"] for g in data["gates"])


def test_compare_of_a_flipped_model_fails_with_exit_3(detector, calib, tmp_path):
    changed = tmp_path / "b.onnx"
    assert run(detector, "--pass", FLIPPING, "-o", changed) == 0
    report = tmp_path / "c.md"
    assert run("compare", detector, changed, "--calib", calib, "--min-cosine", "0.99",
               "--report", report) == 3
    assert "FAIL" in report.read_text() and "worst group output0:score" in report.read_text()
    assert run("compare", detector, tmp_path / "missing.onnx", "--calib", calib) == 1
    assert run("compare", detector) == 2


def test_the_low_rank_pass_measures_with_smooth_flips(detector, calib, monkeypatch):
    """Single-layer trials flip a handful of decisions on a few images: the pass counts them
    smoothly; the run's own fidelity (what gates read) still counts whole flips."""
    import rewriter.passes.lowrank_pass as lowrank_pass

    seen: list[bool] = []
    real = lowrank_pass.task_error

    def recording(*args, **kwargs):
        seen.append(bool(kwargs.get("smooth")))
        return real(*args, **kwargs)

    monkeypatch.setattr(lowrank_pass, "task_error", recording)
    result = rewriter.rewrite(detector, ["bottleneck:target=0.3,init=refit,max-positions=512"],
                              calib=calib, min_samples=4)
    assert seen and all(seen)
    scores = [g for g in result.report.fidelity["groups"].values() if g["kind"] == "score"]
    assert scores
    for group in scores:  # whole flips: a rate times its union is a count
        for t in ("0.25", "0.5"):
            flips = group[f"flip@{t}"] * group[f"decisions@{t}"]
            assert flips == pytest.approx(round(flips), abs=1e-9)
