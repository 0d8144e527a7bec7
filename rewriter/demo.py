"""`make demo`: the main job on the trained digits model that ships with the repo.

Runs fold-bn + bottleneck (refit on the shipped calibration set, 80% of the MACs removed) +
dense-head, measures accuracy on the shipped test split, benchmarks the result A/B in
onnxruntime, and prints the report. Writes under `./onexone-demo/` (the current directory, never
the installed package) only.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rewriter.cli import main
from rewriter.resources import trained_dir

TRAINED = trained_dir()
#: Relative to the current directory at run time.
OUT = Path("onexone-demo")
#: Fold BN so factorization sees the real weights, remove 80% of the MACs where it costs least
#: error (refit on the shipped calibration set), swap the dense head for a 1x1 conv + GAP.
DEMO_PASSES = ("fold-bn", "bottleneck:target=0.8,mode=in", "dense-head:hidden=0", "cleanup")


def demo_args() -> list[str]:
    from rewriter.passes import available

    model = str(TRAINED / "digits_cnn.onnx")
    if "bottleneck" not in available():
        return [model, "--analyze"]
    args = [model]
    for spec in DEMO_PASSES:
        args += ["--pass", spec]
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
