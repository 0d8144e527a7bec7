"""bench_detector's summary (the largest cut keeping mAP within 1 point, auto's pick marked),
its larger calibration sets, and bench_int8's bound on what a MAC cut buys over int8."""

from __future__ import annotations

import numpy as np

from bench.bench_detector import _data, detector_markdown, summarize
from bench.bench_int8 import amdahl_bound


def row(init: str, target, removed: float, after: float, auto: bool = False) -> dict:
    return {"init": init, "target": target, "auto": auto, "options": f"{init}:{target}",
            "macs_before": 1000, "macs_removed": removed, "map50_before": 0.9,
            "map50_after": after, "f1_vs_original": 0.95, "detections_before": 10,
            "detections_after": 9, "whole_tensor_cosine": 0.999, "score_rows_cosine": 0.9,
            **({"auto_target": removed} if auto else {})}


def test_summary_picks_the_largest_cut_within_one_point_and_reports_auto():
    rows = [row("svd", 0.2, 0.2, 0.895), row("svd", 0.4, 0.4, 0.85),
            row("refit", 0.3, 0.3, 0.891), row("refit", 0.5, 0.5, 0.8905),
            row("refit", 0.6, 0.6, 0.70), row("refit", "auto", 0.65, 0.5, auto=True)]
    summary = summarize(rows)
    assert summary["svd_largest_cut_within_1pt"] == 0.2
    assert summary["refit_largest_cut_within_1pt"] == 0.5
    assert summary["whitened_largest_cut_within_1pt"] is None
    assert summary["largest_cut_within_1pt"]["macs_removed"] == 0.5
    assert summary["auto"]["map50_after"] == 0.5
    text = detector_markdown({"rows": rows, "summary": summary})
    assert "auto (65.0%)" in text and "50.0% (`refit:0.5`)" in text


def test_more_calibration_scenes_start_with_the_shipped_ones():
    """--calib-scenes regenerates from the shipped set's seed: a superset, not other scenes
    (identical up to one 8-bit level where another numpy/scikit-image rounds a resize apart)."""
    shipped = _data()[0].inputs["images"]
    more = _data(len(shipped) + 8)[0]
    assert more.n == len(shipped) + 8
    np.testing.assert_allclose(more.inputs["images"][: len(shipped)], shipped, rtol=0,
                               atol=1 / 255 + 1e-6)


def test_int8_amdahl_bound_reads_the_conv_share_of_the_profile():
    profile = {"per_op_ms": {"QLinearConv": 0.4, "ConvInteger": 0.1, "QLinearSigmoid": 0.5},
               "total_ms": 1.0}
    bound = amdahl_bound(profile, 0.4)
    assert bound["conv_time_share"] == 0.5
    assert bound["best_speedup_vs_int8"] == round(1 / (1 - 0.5 * 0.4), 4)
