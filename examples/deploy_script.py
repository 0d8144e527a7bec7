"""Use onexone from a deployment script: rewrite, check the numbers yourself, save.

Run from the repository root:  .venv/bin/python examples/deploy_script.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import rewriter

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "models" / "trained"
OUT = ROOT / "build" / "examples"


def main() -> int:
    model = rewriter.load(TRAINED / "digits_cnn.onnx")
    result = rewriter.rewrite(
        model,
        ["fold-bn", "bottleneck:target=0.8,mode=in", "dense-head:hidden=0", "cleanup"],
        calib=TRAINED / "digits_calib.npz",
        evaluate=TRAINED / "digits_test.npz",
    )
    report = result.report
    drop = report.fidelity["accuracy_before"] - report.fidelity["accuracy_after"]
    print(f"MACs {report.macs_before:,} -> {report.macs_after:,}, "
          f"params {report.params_before:,} -> {report.params_after:,}, accuracy drop {drop:+.2%}")
    if drop > 0.005:
        print("accuracy dropped too much; not saving", file=sys.stderr)
        return 3
    OUT.mkdir(parents=True, exist_ok=True)
    rewriter.save(result.model, OUT / "digits_cnn.small.onnx")
    (OUT / "digits_cnn.small.md").write_text(report.to_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
