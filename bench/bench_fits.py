"""Ablation of the per-layer fits on trained models, judged by the task metric.

Each row rewrites a trained model (fold-bn, then bottleneck with init=refit) with the fit
improvements switched on one at a time, in the order they were added:

    base   Cholesky whitening of Σ+εI, no ALS, no bias correction, no post-activation refit
    white  + whitening by eigendecomposition on the range of Σ (rank-deficient activations)
    als    + Tucker-2 ALS under the input moment for mode=in-out
    bias   + bias correction of the mean output shift (svd/whitened factors)
    act    + post-activation scale/shift refit through a lone SiLU/ReLU (all: the default)

Detector: mAP@0.5 on its test scenes and detections F1 vs the original; digits CNN: accuracy
on its 540 test labels. Options after '+' go to the pass (`act+mode=in-out`).

    .venv/bin/python -m bench.bench_fits detector base,white,act 0.4,0.5 [models/trained]
    .venv/bin/python -m bench.bench_fits digits base,act+mode=in-out 0.9

Writes bench/results/fits.json (rows appended per run, each with its command line).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import one_mode
from rewriter import load, lowrank, lowrank_fit, runtime
from rewriter.calibration import CalibrationSet
from rewriter.pipeline import rewrite

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "fits.json"
ORDER = ("base", "white", "als", "bias", "act")



def _cholesky_spectrum(weight, sigma, alpha=lowrank.DEFAULT_SHRINK, eps=None, tol=None):
    """The whitening before this work: Cholesky of the shrunk Σ + εI, unwhitened by L^{-T}."""
    m = lowrank.unfold_input(weight)
    s = lowrank.shrink_covariance(np.asarray(sigma, np.float64), alpha, lowrank.DEFAULT_EPS)
    try:
        lower = np.linalg.cholesky(s)
    except np.linalg.LinAlgError:
        vals, vecs = np.linalg.eigh(s)
        lower = vecs * np.sqrt(np.clip(vals, 1e-12 * max(vals.max(), 1e-30), None))
    u, sv, vt = lowrank.thin_svd(lower.T @ m)
    return lowrank.Spectrum(u, sv, vt, np.linalg.inv(lower.T))


@contextlib.contextmanager
def variant(name: str):
    """Switch off every improvement after `name` (module settings, restored on exit)."""
    level = ORDER.index(name.split("+")[0])
    off = [(lowrank, "whitened_spectrum", _cholesky_spectrum), (lowrank, "DEFAULT_ALS_ITERS", 0),
           (lowrank, "BIAS_CORRECTION", False), (lowrank_fit, "POST_ACT_ROWS", 0)][level:]
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in off]
    for mod, attr, value in off:
        setattr(mod, attr, value)
    try:
        yield "".join("," + o for o in name.split("+")[1:])
    finally:
        for mod, attr, value in saved:
            setattr(mod, attr, value)


def detector_rows(names, targets, folder: Path) -> list[dict[str, Any]]:
    from rewriter.detection import decode, detection_f1, load_ground_truth, map50

    with np.load(folder / "detector_calib.npz") as f:
        calib = CalibrationSet({"images": f["images"]}, None, "detector_calib.npz")
    with np.load(folder / "detector_test.npz") as f:
        images, truth = f["images"], load_ground_truth({"images": f["images"], "gt": f["gt"]})
    ref = None
    rows = []
    for target in targets:
        for name in names:
            with variant(name) as extra:
                spec = f"bottleneck:target={target},init=refit,sensitivity=false{one_mode(extra)}"
                started = time.perf_counter()
                result = rewrite(load(folder / "detector.onnx"), ["fold-bn", spec], calib=calib)
                seconds = time.perf_counter() - started
            if ref is None:
                ref = decode(runtime.run_all(result.original, {"images": images})["output0"])
            got = decode(runtime.run_all(result.model, {"images": images})["output0"])
            r = result.report
            rows.append({"model": "detector", "variant": name, "options": f"fold-bn,{spec}",
                         "macs_removed": round(1 - r.macs_after / r.macs_before, 4),
                         "map50_before": round(map50(ref, truth), 4),
                         "map50_after": round(map50(got, truth), 4),
                         "f1_vs_original": round(detection_f1(ref, got), 4),
                         "rewrite_s": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def digits_rows(names, targets, folder: Path) -> list[dict[str, Any]]:
    with np.load(folder / "digits_test.npz") as f:
        inputs, labels = f["input"], f["labels"]
    rows = []
    for target in targets:
        for name in names:
            with variant(name) as extra:
                spec = f"bottleneck:target={target},init=refit,sensitivity=false{one_mode(extra)}"
                result = rewrite(load(folder / "digits_cnn.onnx"), ["fold-bn", spec],
                                 calib=folder / "digits_calib.npz")
            ref = runtime.run_all(result.original, {"input": inputs})["logits"].argmax(1)
            got = runtime.run_all(result.model, {"input": inputs})["logits"].argmax(1)
            r = result.report
            rows.append({"model": "digits", "variant": name, "options": f"fold-bn,{spec}",
                         "macs_removed": round(1 - r.macs_after / r.macs_before, 4),
                         "accuracy_before": round(float((ref == labels).mean()), 4),
                         "accuracy_after": round(float((got == labels).mean()), 4),
                         "agreement": round(float((ref == got).mean()), 4)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        raise SystemExit(__doc__)
    topic, names, targets = argv[0], argv[1].split(","), argv[2].split(",")
    folder = Path(argv[3]) if len(argv) > 3 else ROOT / "models" / "trained"
    rows = (detector_rows if topic == "detector" else digits_rows)(names, targets, folder)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": []}
    old["runs"].append({"command": "python -m bench.bench_fits " + " ".join(argv),
                        "rows": rows})
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(old, indent=1) + "\n")
    tmp.replace(RESULTS)


if __name__ == "__main__":
    main(sys.argv[1:])
