"""The tool's own speed on a 1 G-MAC detector, and where the time goes.

The issue's bar: `bottleneck` with a target on a 1 G-MAC YOLOv8-family detector with 100
calibration images, measured sensitivity included, in at most 2 minutes on 2 cores. The
workload is the shipped trained detector's weights in the same architecture at 480x480 (1.17 G
MACs; the convs are size-agnostic, only the anchor grid grows), fed 480x480 images that tile
5x5 shipped-style 96x96 scenes, so every conv sees content at the scale it was trained on.
`fold-bn` then `bottleneck:target=0.4,init=refit` (method=auto: per-layer measured allocation)
runs once under a timestamped log; the time between log lines is charged to the stage the
earlier line opened (setup, input statistics, sensitivity trials, whole-model back-off, and
refit, which includes the final emission and the report's measurements).

    .venv/bin/python -m bench.bench_speed

Writes bench/results/speed.json. The model and images are cached under /tmp/onexone-bench-speed.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from rewriter import load
from rewriter.bench import machine_info
from rewriter.calibration import CalibrationSet
from rewriter.pipeline import rewrite

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "speed.json"
CACHE = Path("/tmp/onexone-bench-speed")
TRAINED = ROOT / "models" / "trained" / "detector.onnx"
TILES = 5  # 5 x 96 = 480 pixels a side
IMAGES = 100
PASSES = ["fold-bn", "bottleneck:target=0.4,init=refit"]
TARGET_S = 120.0
#: Log-line prefixes -> the stage they open (the first match wins; the rest is "other").
STAGES = (("pass bottleneck", "setup"), ("low-rank: input statistics", "input statistics"),
          ("sensitivity:", "sensitivity trials"), ("back-off", "whole-model back-off"),
          ("low-rank: refit", "refit"))


def build(path: Path) -> Path:
    """The shipped detector's trained weights in the architecture at 480x480, exported."""
    import torch

    from models.detector import IMAGE_SIZE, DigitDetector
    from models.train_detector import export_detector

    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(TRAINED)).graph.initializer}
    model = DigitDetector(size=IMAGE_SIZE * TILES)
    state = model.state_dict()
    state.update({k: torch.from_numpy(v.copy()) for k, v in weights.items() if k in state})
    model.load_state_dict(state)
    export_detector(model.eval(), path, tiled_images(2, seed=1))
    return path


def tiled_images(count: int, seed: int = 10_001) -> np.ndarray:
    """`count` 480x480 images, each a 5x5 mosaic of 96x96 train scenes."""
    from models.detector_data import make_scenes

    small = make_scenes(count * TILES * TILES, seed, split="train").images
    n, c, h, w = small.shape
    grid = small.reshape(count, TILES, TILES, c, h, w)
    return np.ascontiguousarray(grid.transpose(0, 3, 1, 4, 2, 5).reshape(count, c, h * TILES,
                                                                          w * TILES))


def stage_of(message: str, current: str) -> str:
    """The stage a log line opens, or `current` when it opens none."""
    for prefix, stage in STAGES:
        if prefix in message:
            return stage
    return current


def timed_rewrite(model_path: Path, images: np.ndarray) -> dict[str, Any]:
    """One rewrite under a timestamped log: total seconds, seconds per stage, trial count."""
    calib = CalibrationSet({"images": images}, None, f"{len(images)} tiled scenes")
    seconds: dict[str, float] = {}
    trials = 0
    state = {"stage": "setup", "since": time.perf_counter()}

    def log(message: str) -> None:
        nonlocal trials
        now = time.perf_counter()
        stage = stage_of(message, state["stage"])
        if stage != state["stage"]:
            seconds[state["stage"]] = seconds.get(state["stage"], 0.0) + now - state["since"]
            state.update(stage=stage, since=now)
        trials += message.startswith("sensitivity:")

    started = time.perf_counter()
    result = rewrite(load(model_path), PASSES, calib=calib, log=log)
    total = time.perf_counter() - started
    seconds[state["stage"]] = seconds.get(state["stage"], 0.0) + (
        time.perf_counter() - state["since"])
    bottleneck = next(p for p in result.report.passes if p.name == "bottleneck")
    return {
        "total_s": round(total, 1),
        "stages_s": {k: round(v, 1) for k, v in seconds.items()},
        "sensitivity_trials": trials,
        "ms_per_trial": round(1e3 * seconds.get("sensitivity trials", 0.0) / max(trials, 1), 1),
        "macs_before": result.report.macs_before,
        "macs_removed": round(1 - result.report.macs_after / result.report.macs_before, 4),
        "layers_rewritten": bottleneck.metrics.get("layers_rewritten", 0),
        "sensitivity_samples": bottleneck.metrics.get("sensitivity_samples"),
        "allocation": bottleneck.metrics.get("allocation"),
        "met_target": total <= TARGET_S,
    }


def run(full: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"topic": "speed", "full": full, "machine": machine_info(),
                           "passes": PASSES, "images": IMAGES, "target_s": TARGET_S}
    if importlib.util.find_spec("torch") is None or not TRAINED.exists():
        out["skipped"] = "needs torch (the [dev] extra) and models/trained/detector.onnx"
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    model = CACHE / "detector480.onnx"
    images_path = CACHE / f"images-{IMAGES}.npy"
    if not model.exists():
        build(model)
    if not images_path.exists():
        np.save(images_path, tiled_images(IMAGES))
    out.update(timed_rewrite(model, np.load(images_path)))
    out["markdown"] = markdown(out)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    return out


def markdown(out: dict[str, Any]) -> str:
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in out["stages_s"].items())
    return (f"Tool speed: `{' → '.join(out['passes'])}` on a {out['macs_before'] / 1e9:.2f} G-MAC "
            f"detector with {out['images']} calibration images: {out['total_s']:.1f} s "
            f"(target {out['target_s']:.0f} s: {'met' if out['met_target'] else 'missed'}); "
            f"{stages}; {out['sensitivity_trials']} sensitivity trials at "
            f"{out['ms_per_trial']:.0f} ms each on {out.get('sensitivity_samples')} held-out "
            f"images; {out['macs_removed']:.1%} of MACs removed.")


if __name__ == "__main__":
    result = run()
    print(result.get("markdown", result.get("skipped")))
