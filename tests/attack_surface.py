"""`python -m tests.attack_surface`: the review's attack classes as real CLI runs, tallied.

For each run: exit code, whether stderr holds a traceback, whether it hit the 60 s hang limit,
whether any input file changed, and whether a written model fails the checker or holds
non-finite weights. Prints one line per run and the totals (JSON on the last line).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.builders import conv_model
from tests.conftest import ROOT
from tests.harden_helpers import calib_npz, small_model
from tests.test_limits import _zip_bomb, loop_model
from tests.test_security import external_model


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file() and not p.is_symlink() and not p.name.startswith(".onexone")
            and "out" not in p.parts[-2:][0]}


def _model_problem(path: Path) -> str | None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
        for init in onnx.load(str(path)).graph.initializer:
            array = numpy_helper.to_array(init)
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                return f"non-finite {init.name}"
    except Exception as exc:  # noqa: BLE001 - tallied
        return f"invalid: {exc}"
    return None


def cases(d: Path) -> list[tuple[str, list, dict]]:
    m = small_model(d, "m.onnx", external=True)
    calib = calib_npz(d)
    (d / "run.toml").write_text('[[pass]]\nname = "cleanup"\n')
    os.mkfifo(d / "fifo")
    (d / "afile").write_text("x")
    b = d / "b.onnx"
    onnx.save(conv_model(["n", 16, 8, 8], 16, [3, 3], pads=[1] * 4, relu=True), b)
    x = np.random.default_rng(0).standard_normal((32, 16, 8, 8)).astype(np.float32)
    good16 = calib_npz(d, name="c16.npz", x=x)
    bad = {}
    for name, value in (("nan", np.nan), ("inf", np.inf), ("big", 3e38)):
        y = x.copy()
        y[3] = value
        bad[name] = calib_npz(d, name=f"{name}.npz", x=y)
    np.savez(d / "str.npz", x=np.array([["a"]] * 8))
    np.savez(d / "lab.npz", x=x, labels=np.zeros((32, 2)))
    _zip_bomb(d / "bomb.npz", 96 * 2**20)
    loop = loop_model(d / "loop.onnx")
    loopc = loop_model(d / "loopc.onnx", computed_trips=True)
    huge = d / "huge.onnx"
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                         [1, 16, 4096, 4096])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                         [1, 16, 4096, 4096])])
    hm = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    hm.ir_version = 8
    onnx.save(hm, huge)
    ext_dir = d / "ext"
    ext_dir.mkdir()
    nul = external_model(ext_dir, "w.data")
    proto = onnx.load(str(nul), load_external_data=False)
    proto.graph.initializer[0].external_data[0].value = "w\x00.data"
    nul.write_bytes(proto.SerializeToString())
    o = d / "out" / "o.onnx"
    runs = [
        ("report over model", [m, "--pass", "cleanup", "--report", m], {}),
        ("report over model data", [m, "--pass", "cleanup", "--report", d / "m.onnx.data"], {}),
        ("report over -o", [m, "--pass", "cleanup", "-o", o, "--report", o], {}),
        ("-o over calib", [m, "--pass", "cleanup", "--calib", calib, "-o", calib], {}),
        ("-o over config", [m, "--config", d / "run.toml", "-o", d / "run.toml"], {}),
        ("-o over fifo", [m, "--pass", "cleanup", "-o", d / "fifo"], {}),
        ("-o under a file", [m, "--pass", "cleanup", "-o", d / "afile" / "o.onnx"], {}),
        ("-o into /proc", [m, "--pass", "cleanup", "-o", "/proc/x.onnx"], {}),
        ("ridge=nan refit", [b, "--pass", "bottleneck:ridge=nan,init=refit", "--calib", good16,
                             "-o", o], {}),
        *[(f"{k} calib {init}", [b, "--pass", f"bottleneck:init={init}", "--calib", p, "-o", o],
           {}) for k, p in bad.items() for init in ("refit", "whitened")],
        ("string npz", [m, "--pass", "fold-bn", "--calib", d / "str.npz", "-o", o], {}),
        ("2-D labels", [b, "--pass", "fold-bn", "--calib", d / "lab.npz", "-o", o], {}),
        ("zip bomb", [m, "--pass", "fold-bn", "--calib", d / "bomb.npz", "-o", o],
         {"ONEXONE_MEMORY_LIMIT": "32M"}),
        ("loop 2^62 analyze", [loop, "--analyze"], {}),
        ("loop 2^62 dry-run", [loop, "--dry-run", "--pass", "fold-bn"], {}),
        ("loop 2^62 fold-bn", [loop, "--pass", "fold-bn", "-o", o], {}),
        ("computed loop", [loopc, "--pass", "fold-bn", "-o", o], {"ONEXONE_RUN_TIMEOUT": "2"}),
        ("1x16x4096x4096 input", [huge, "--pass", "fold-bn", "-o", o], {}),
        ("NUL in location", [nul, "--analyze"], {}),
        ("calib random scalar-free", [m, "--pass", "cleanup", "--calib", "random", "-o", o], {}),
        ("control: valid run", [b, "--pass", "bottleneck:init=refit", "--calib", good16, "-o", o,
                                "--report", d / "out" / "r.json"], {}),
    ]
    return runs


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        runs = cases(d)
        totals = {"runs": 0, "tracebacks": 0, "hangs": 0, "inputs_damaged": 0,
                  "bad_models_written": 0}
        for label, args, env in runs:
            before = _hashes(d)
            out = d / "out" / "o.onnx"
            if out.exists():
                out.unlink()
            try:
                r = subprocess.run([sys.executable, "-m", "rewriter.cli", *map(str, args), "-q"],
                                   capture_output=True, text=True, timeout=60, cwd=ROOT,
                                   env={**os.environ, **env})
                code, err, hang = r.returncode, r.stderr, False
            except subprocess.TimeoutExpired:
                code, err, hang = None, "", True
            damaged = [k for k, v in before.items() if _hashes(d).get(k) != v]
            problem = _model_problem(out) if out.exists() else None
            totals["runs"] += 1
            totals["tracebacks"] += "Traceback" in err
            totals["hangs"] += hang
            totals["inputs_damaged"] += bool(damaged)
            totals["bad_models_written"] += problem is not None
            line = err.strip().splitlines()[-1][:110] if err.strip() else ""
            print(f"{label:28s} exit={code} {line}")
        print(json.dumps(totals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
