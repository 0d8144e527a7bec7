"""Tiny files must not hang the tool or exhaust memory: every run of the user's model is bounded.

The review's cases: a 2^62-iteration Loop (constant trip count) under --analyze, --dry-run and
fold-bn; a Loop whose trip count is computed at run time (stopped by the wall-clock limit); a
zip-bomb .npz; a model declaring a 1x16x4096x4096 input; 20k unnamed Conv->Relu pairs named by
`deepen`. Subprocesses carry a timeout, so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import rewriter
from rewriter.errors import ResourceLimitError
from rewriter.graph import Namer
from tests.conftest import ROOT
from tests.test_bad_input import assert_one_line_error, rewrite_cli


def loop_model(path, *, computed_trips: bool = False):
    """x[1] -> Loop(M = 2^62, cond true){v + 1} -> y; with `computed_trips`, M = a * b at run
    time, so no static check can see it."""
    body = helper.make_graph(
        [helper.make_node("Add", ["v", "one"], ["v2"]),
         helper.make_node("Identity", ["cond"], ["cond2"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond2", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v2", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.ones(1, np.float32), "one")])
    nodes = [helper.make_node("Loop", ["M", "c", "x"], ["y"], body=body, name="loop")]
    inits = [numpy_helper.from_array(np.array(True), "c")]
    if computed_trips:
        nodes.insert(0, helper.make_node("Mul", ["a", "b"], ["M"], name="trips"))
        inits += [numpy_helper.from_array(np.array(2**31, np.int64), "a"),
                  numpy_helper.from_array(np.array(2**31, np.int64), "b")]
    else:
        inits.append(numpy_helper.from_array(np.array(2**62, np.int64), "M"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                        [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("args", [["--analyze"], ["--dry-run", "--pass", "fold-bn"],
                                  ["--pass", "fold-bn"]])
def test_constant_loop_of_2_62_iterations_fails_fast(tmp_path, args):
    path = loop_model(tmp_path / "loop.onnx")
    # A hang is caught by the subprocess timeout (it raises), not by timing the run.
    result = rewrite_cli(path, *args, "-o", tmp_path / "o.onnx", timeout=60)
    if result.returncode == 0:  # --analyze never runs the model: it may just finish
        assert args == ["--analyze"] and "Traceback" not in result.stderr
    else:
        assert_one_line_error(result, "'loop' (Loop)", "ONEXONE_MAX_LOOP_ITERATIONS")
    assert not (tmp_path / "o.onnx").exists()


def test_loop_with_computed_trip_count_stopped_by_the_clock(tmp_path, monkeypatch):
    path = loop_model(tmp_path / "loop.onnx", computed_trips=True)
    monkeypatch.setenv("ONEXONE_RUN_TIMEOUT", "1")
    # The error names the 1 s limit: the clock, not the loop's end, stopped the run.
    with pytest.raises(ResourceLimitError, match="within 1 s.*ONEXONE_RUN_TIMEOUT"):
        rewriter.rewrite(rewriter.load(path), ["fold-bn"])


def test_computed_loop_cli_one_line(tmp_path):
    import os

    path = loop_model(tmp_path / "loop.onnx", computed_trips=True)
    env = {**os.environ, "ONEXONE_RUN_TIMEOUT": "1"}
    result = subprocess.run([sys.executable, "-m", "rewriter.cli", str(path), "--pass",
                             "fold-bn", "-o", str(tmp_path / "o.onnx")], capture_output=True,
                            text=True, timeout=60, cwd=ROOT, env=env)
    assert_one_line_error(result, "did not finish within 1 s")
    assert not (tmp_path / "o.onnx").exists()


def _zip_bomb(path, nbytes: int) -> None:
    """An .npz of one float32 zeros array of `nbytes`, written in chunks (never in memory)."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (nbytes // (4 * 4 * 8 * 8), 4,
                                                                 8, 8)}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            chunk = bytes(2**20)
            for _ in range(nbytes // len(chunk)):
                f.write(chunk)


_RSS_SCRIPT = """
import resource, sys
import rewriter
from rewriter.errors import OnexoneError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    rewriter.rewrite(sys.argv[1], ["fold-bn"], calib=sys.argv[2] if len(sys.argv) > 2 else None)
    print("accepted")
except OnexoneError as exc:
    print("refused:", exc)
print("peak_growth_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def _rewrite_in_subprocess(*args, env=None) -> tuple[str, int]:
    import os

    result = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, *map(str, args)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, **(env or {})})
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and lines, result.stderr
    return "\n".join(lines[:-1]), int(lines[-1].split()[-1])


def test_zip_bomb_npz_refused_from_its_headers(tmp_path):
    from tests.harden_helpers import small_model

    bomb = tmp_path / "bomb.npz"
    _zip_bomb(bomb, 96 * 2**20)
    assert bomb.stat().st_size < 2**20  # a small file ...
    message, growth = _rewrite_in_subprocess(small_model(tmp_path), bomb,
                                             env={"ONEXONE_MEMORY_LIMIT": "32M"})
    assert "refused:" in message and "once decompressed" in message, message
    assert "ONEXONE_MEMORY_LIMIT" in message
    assert growth < 100 * 1024  # ... never inflated


def test_huge_declared_input_refused_by_the_memory_bound(tmp_path):
    """1x16x4096x4096 float32 is 1 GiB per sample: the guard's samples are never allocated."""
    path = tmp_path / "huge.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 4096, 4096])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 4096, 4096])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    assert path.stat().st_size < 10_000
    message, growth = _rewrite_in_subprocess(path, env={"ONEXONE_MEMORY_LIMIT": "4G"})
    assert "refused:" in message and "memory limit" in message, message
    assert "ONEXONE_MEMORY_LIMIT" in message
    assert growth < 300 * 1024


def test_memory_limit_shrinks_batches_instead_of_failing(tmp_path, monkeypatch):
    """A limit below a batch but above one sample: the run goes on in smaller batches."""
    from rewriter import limits, runtime
    from tests.builders import conv_model

    model = rewriter.load(conv_model(["n", 4, 8, 8], 8, [3, 3], pads=[1] * 4))
    per_sample = limits.sample_bytes(model)
    monkeypatch.setenv("ONEXONE_MEMORY_LIMIT", str(per_sample * 3))
    x = np.random.default_rng(0).standard_normal((10, 4, 8, 8)).astype(np.float32)
    sizes = [len(b["y"]) for b in runtime.run_batched(runtime.make_session(model), {"x": x})]
    assert sizes == [3, 3, 3, 1]
    monkeypatch.setenv("ONEXONE_MEMORY_LIMIT", str(per_sample // 2))
    with pytest.raises(ResourceLimitError, match="one sample"):
        list(runtime.run_batched(runtime.make_session(model), {"x": x}))


def test_namer_is_linear():
    """20k names of one base: each call resumes the suffix search instead of restarting, so
    lookups grow linearly (the quadratic namer made 2*10^8 of them; deepen took minutes)."""
    from onnx_ir import Graph

    class CountingSet(set):
        lookups = 0

        def __contains__(self, item):
            CountingSet.lookups += 1
            return super().__contains__(item)

    namer = Namer(Graph([], [], nodes=[]))
    namer._taken = CountingSet()
    names = [namer("relu_deepen") for _ in range(20_000)]
    assert len(set(names)) == 20_000
    assert names[:3] == ["relu_deepen", "relu_deepen_1", "relu_deepen_2"]
    assert CountingSet.lookups <= 2 * 20_000
