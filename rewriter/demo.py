"""`make demo`: the main job on the trained digits model that ships with the repo.

Runs fold-bn + bottleneck (refit on the shipped calibration set) + dense-head, benchmarks the
result A/B in onnxruntime, and prints the report. Writes under build/demo/ only.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rewriter.cli import main

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "models" / "trained"
OUT = ROOT / "build" / "demo"


def demo_args() -> list[str]:
    from passes import available

    model = str(TRAINED / "digits_cnn.onnx")
    passes = [p for p in ("fold-bn", "bottleneck", "dense-head") if p in available()]
    if "bottleneck" not in passes:
        return [model, "--analyze"]
    args = [model]
    for name in passes:
        args += ["--pass", name]
    return args + [
        "--calib", str(TRAINED / "digits_calib.npz"),
        "--eval", str(TRAINED / "digits_test.npz"),
        "-o", str(OUT / "digits_cnn.rewritten.onnx"),
        "--report", str(OUT / "report.json"),
        "--report", str(OUT / "report.md"),
        "--bench",
    ]


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    sys.exit(main(demo_args()))
