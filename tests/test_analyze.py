"""`rewrite MODEL --analyze`: the per-layer table, candidates, and the --json contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import rewriter
from tests.builders import conv_model, save

REWRITE = [sys.executable, "-m", "rewriter.cli"]


def test_analysis_marks_expensive_kxk_convs_as_candidates():
    model = rewriter.load(conv_model([1, 256, 28, 28], 32, [5, 5], pads=[2, 2, 2, 2]))
    analysis = rewriter.analyze(model)
    (row,) = [r for r in analysis.rows if r.op == "Conv"]
    assert row.candidate and row.rank == 128
    assert row.macs == 160_563_200
    # 1x1 to 128 channels then 5x5: 784*128*256 + 784*32*128*25
    assert row.macs_after == 784 * 128 * 256 + 784 * 32 * 128 * 25
    assert analysis.candidate_saving == row.macs - row.macs_after


def test_pointwise_and_depthwise_convs_are_not_candidates():
    for proto in (
        conv_model([1, 64, 16, 16], 64, [1, 1]),
        conv_model([1, 64, 16, 16], 64, [3, 3], group=64, pads=[1, 1, 1, 1]),
    ):
        rows = rewriter.analyze(rewriter.load(proto)).rows
        assert not any(r.candidate for r in rows)


def test_json_output_is_only_json_with_integer_counts(tmp_path: Path):
    path = save(conv_model(["N", 256, 28, 28], 32, [5, 5], pads=[2, 2, 2, 2]), tmp_path / "m.onnx")
    proc = subprocess.run(
        [*REWRITE, str(path), "--analyze", "--json"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["total_macs"] == 160_563_200 and isinstance(data["total_macs"], int)
    layer = data["layers"][0]
    assert layer["op"] == "Conv" and isinstance(layer["macs"], int) and layer["candidate"] is True


def test_table_lists_largest_first(tmp_path: Path):
    path = save(
        conv_model([1, 64, 32, 32], 64, [3, 3], pads=[1, 1, 1, 1], relu=True), tmp_path / "m.onnx"
    )
    proc = subprocess.run([*REWRITE, str(path), "--analyze"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    conv_line = next(i for i, line in enumerate(lines) if " Conv " in line)
    relu_line = next(i for i, line in enumerate(lines) if " Relu " in line)
    assert conv_line < relu_line
    assert "bottleneck candidates could save" in proc.stdout


def test_shape_arithmetic_static_inference_misses_is_filled_by_running():
    """PP-OCRv4 rec computes a Reshape target with Shape→Gather→Concat, which onnx's data
    propagation gives up on; with the input fixed, analysis still knows every layer's MACs."""
    from tests.conftest import rapidocr_model

    model = rewriter.load(rapidocr_model("rec"))
    analysis = rewriter.analyze(model, {"x": (1, 3, 48, 320)})
    assert analysis.unknown == []
    assert analysis.total_macs > 500_000_000
    out = model.graph.outputs[0].shape  # the user's model keeps its dynamic dims
    assert not isinstance(out[0], int) and not isinstance(out[1], int)
