"""bench_detector's summary: the largest cut keeping mAP within 1 point, auto's pick marked."""

from __future__ import annotations

from bench.bench_detector import detector_markdown, summarize


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
