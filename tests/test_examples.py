"""The recipes in examples/ and `make demo` run as documented."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_deploy_script_example_saves_a_smaller_model():
    proc = subprocess.run([sys.executable, "examples/deploy_script.py"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = ROOT / "build" / "examples" / "digits_cnn.small.onnx"
    onnx.checker.check_model(str(out), full_check=True)
    assert "accuracy drop +0.00%" in proc.stdout or "accuracy drop -" in proc.stdout


@pytest.mark.slow
def test_ci_gate_example_passes_its_gates():
    proc = subprocess.run([sys.executable, "-m", "rewriter.cli", "--config",
                           "examples/ci_gate.toml", "-q"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((ROOT / "build" / "examples" / "ci_report.json").read_text())
    assert all(g["passed"] for g in report["gates"]) and len(report["gates"]) == 2
    assert report["macs_after"] < 0.35 * report["macs_before"]


@pytest.mark.slow
def test_demo_rewrites_the_shipped_model_and_prints_the_report(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rewriter.demo"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "pass bottleneck" in proc.stdout and "accuracy" in proc.stdout
    report = json.loads((tmp_path / "onexone-demo" / "report.json").read_text())
    assert report["written"] and report["macs_after"] < 0.3 * report["macs_before"]
    fidelity = report["fidelity"]
    assert fidelity["accuracy_before"] - fidelity["accuracy_after"] <= 0.005
