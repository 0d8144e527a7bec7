"""Honest numbers on the terminal: no partial totals, signed changes, class-score headlines,
applied decisions first, no fidelity claim from random data, whole-job progress."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

import rewriter
from rewriter.cli import main
from rewriter.report import PassReport, RunReport
from tests.builders import conv_model, make_model


@pytest.fixture
def dynamic(tmp_path):
    path = tmp_path / "dyn.onnx"
    onnx.save(conv_model(["N", 16, "H", "W"], 16, [3, 3], pads=[1, 1, 1, 1]), str(path))
    return path


def test_analyze_of_dynamic_shapes_says_what_to_type_and_prints_no_totals(dynamic, capsys):
    assert main([str(dynamic), "--analyze"]) == 1
    out, err = capsys.readouterr()
    assert "input x: float [N, 16, H, W]" in out
    assert "total:" not in out and "MACs" not in out
    assert "--input-shape x:1,16,H,W" in err and "H, W" in err
    assert len(err.strip().splitlines()) == 1


def test_analyze_takes_shapes_from_calib(dynamic, tmp_path, capsys):
    npz = tmp_path / "c.npz"
    np.savez(npz, x=np.zeros((2, 16, 6, 8), np.float32))
    assert main([str(dynamic), "--analyze", "--calib", str(npz)]) == 0
    out = capsys.readouterr().out
    assert "input x: float [N, 16, H, W]" in out and "x:1,16,6,8 (from --calib)" in out
    assert main([str(dynamic), "--analyze", "--json", "--input-shape", "x:1,16,6,8"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["total_macs"] == 6 * 8 * 16 * 16 * 9
    assert data["inputs"] == [{"name": "x", "dtype": "float", "shape": ["N", "16", "H", "W"]}]


def test_a_pass_blocked_by_unknown_shapes_is_an_error(dynamic, tmp_path, capsys):
    code = main([str(dynamic), "--pass", "bottleneck:init=svd,target=0.3", "-q"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "pass 'bottleneck' applied nothing" in err and "--input-shape x:1,16,H,W" in err
    assert not (tmp_path / "dyn.rewritten.onnx").exists()
    fixed = main([str(dynamic), "--pass", "bottleneck:init=svd,ratio=0.5", "-q",
                  "--input-shape", "x:1,16,8,8"])
    assert fixed == 0 and (tmp_path / "dyn.rewritten.onnx").exists()


def _console() -> Console:
    return Console(file=io.StringIO(), width=200, no_color=True, force_terminal=False)


def test_a_mac_increase_is_printed_as_an_increase():
    from rewriter.render import change, totals_line

    assert change(100, 80) == "-20.0%" and change(100, 105) == "+5.0%"
    report = RunReport(model=None, macs_before=1000, macs_after=1200, params_before=10,
                       params_after=10)
    assert "(+20.0%)" in totals_line(report)
    report.macs_unknown_nodes = 3
    assert "MACs unknown (3 nodes" in totals_line(report)


def test_top1_headline_only_from_class_score_outputs():
    from rewriter.render import fidelity_lines

    def _fidelity_line(f):
        return fidelity_lines(f)[0]

    base = {"cosine": 0.99, "rel_l2": 0.01, "sqnr_db": 40.0, "samples": 8}
    two = {**base, "top1_agreement": 0.84, "outputs": {
        "boxes": {"top1_agreement": 0.84}, "logits": {"top1_agreement": 1.0}}}
    line = _fidelity_line(two)
    assert "top-1 agreement 100.00% (logits)" in line and "84" not in line
    regression = {**base, "top1_agreement": 0.5, "outputs": {
        "boxes": {"top1_agreement": 0.5}, "depth": {"top1_agreement": 0.7}}}
    assert "top-1" not in _fidelity_line(regression)
    kinds = {**base, "outputs": {"a": {"top1_agreement": 0.5, "kind": "value"},
                                 "b": {"top1_agreement": 0.9, "kind": "score"}}}
    assert "top-1 agreement 90.00% (b)" in _fidelity_line(kinds)


def test_summary_shows_applied_first_then_skip_counts():
    from rewriter.render import print_run_report

    p = PassReport("bottleneck")
    for i in range(40):
        p.skipped(f"small{i}", "Conv", "below min-channels (4 < 8)")
    p.skipped("dw", "Conv", "depthwise conv")
    for i in range(35):
        p.applied(f"big{i}", "Conv", "rank 16", macs_before=100, macs_after=50)
    console = _console()
    print_run_report(RunReport(model=None, passes=[p], macs_before=1, macs_after=1), console)
    out = console.file.getvalue()
    assert "35 applied, 41 skipped" in out
    assert "big0" in out and "big29" in out and "5 more applied" in out
    assert "small0" not in out
    assert "skipped 40: below min-channels (4 < 8)" in out and "skipped 1: depthwise conv" in out


def _embedding_model(path):
    """ids[N, 6] int32 -> Gather(table[100, 4]) -> ReduceMean -> scores[N, 4]."""
    table = np.random.default_rng(0).standard_normal((100, 4)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("ReduceMean", ["e"], ["scores"], name="mean", axes=[1],
                              keepdims=0)]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT32, ["N", 6])
    out = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 4])
    onnx.save(make_model(nodes, [ids], [out], [numpy_helper.from_array(table, "table")],
                         opset=17), str(path))
    return path


def test_random_int_calibration_draws_real_ids_and_makes_no_fidelity_claim(tmp_path, capsys):
    from rewriter.calibration import load_calibration

    model = _embedding_model(tmp_path / "emb.onnx")
    data = load_calibration("random", rewriter.load(model))
    ids = data.inputs["ids"]
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < 100
    assert len(np.unique(ids)) > 20  # not just 0 and 1
    report = tmp_path / "r.md"
    assert main([str(model), "--pass", "cleanup", "--calib", "random", "--report",
                 str(report)]) == 0
    out = capsys.readouterr().out
    assert "fidelity on" not in out and "proves nothing" in out
    md = report.read_text()
    assert "fidelity on" not in md and "proves nothing" in md
    assert "| `identity` | `True` |" in md  # options as a table, not a Python dict


def test_progress_lines_show_the_whole_job_in_logs(monkeypatch):
    import rewriter.progress as progress

    assert progress.progress_line("pass 2/4 bottleneck", "refit layer", 3, 34, 12.0) == (
        "[pass 2/4 bottleneck] refit layer 3/34, 12s elapsed, ETA 2m04s")  # 4 s a layer, 31 to go
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.0)
    console = _console()
    with progress.show_progress(console):
        progress.set_stage("pass 1/1 bottleneck")
        with progress.Counter(2, "refit layer") as layers:
            layers.advance()
            layers.advance()
        assert list(progress.track(range(2), "benchmark")) == [0, 1]
    out = console.file.getvalue()
    assert "[pass 1/1 bottleneck] refit layer 1/2" in out and "ETA" in out
    assert "refit layer 2/2" in out and "benchmark 2/2" in out
    assert "\x1b[" not in out
