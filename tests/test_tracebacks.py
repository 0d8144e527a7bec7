"""Data and model problems end in one line and exit 1 or 2, never a traceback.

Each case is one the review saw crash with a traceback: string-typed outputs once a pass
applies, `--calib random` without a batch axis, a model onnxruntime loads but cannot run,
string and 2-D label arrays, broken external-data entries, a full disk while writing the report
or plot (which must then leave no model), and the last-resort handler for everything else.
"""

from __future__ import annotations

import errno

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import rewriter
from rewriter import atomic
from rewriter.errors import ModelLoadError
from tests.builders import make_model
from tests.harden_helpers import calib_npz, run_main, small_model, snapshot
from tests.test_bad_input import assert_one_line_error
from tests.test_security import external_model


def _conv_bn(tail: list, outputs: list, inits: list = ()) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    arrays = {"W": rng.standard_normal((4, 4, 3, 3)).astype(np.float32),
              "s": np.ones(4, np.float32), "b": np.zeros(4, np.float32),
              "m": np.zeros(4, np.float32), "v": np.ones(4, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"],
                              name="bn"), *tail]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])
    inits = [numpy_helper.from_array(a, k) for k, a in arrays.items()] + list(inits)
    return make_model(nodes, [x], outputs, inits)


def _float_out(name="y"):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


@pytest.mark.parametrize("with_calib", [False, True])
def test_string_output_survives_a_pass(tmp_path, capfd, with_calib):
    strings = helper.make_tensor("sv", TensorProto.STRING, [2], [b"cat", b"dog"])
    proto = _conv_bn([helper.make_node("Identity", ["bn"], ["y"], name="id"),
                      helper.make_node("Constant", [], ["sc"], name="k", value=strings),
                      helper.make_node("Identity", ["sc"], ["names"], name="id2")],
                     [_float_out(), helper.make_tensor_value_info("names", TensorProto.STRING,
                                                                  None)])
    path = tmp_path / "s.onnx"
    onnx.save(proto, path)
    extra = ["--calib", calib_npz(tmp_path)] if with_calib else []
    out = tmp_path / "o.onnx"
    result = run_main(capfd, path, "--pass", "fold-bn", *extra, "-o", out)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "BatchNormalization" not in ops


def test_calib_random_without_batch_axis(tmp_path, capfd):
    proto = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])], [_float_out()])
    path = tmp_path / "scalar.onnx"
    onnx.save(proto, path)
    result = run_main(capfd, path, "--pass", "cleanup", "--calib", "random", "-o",
                      tmp_path / "o.onnx")
    assert_one_line_error(result, "input 'x'")


def test_model_that_loads_but_cannot_run(tmp_path, capfd):
    """Gather with an out-of-range index: onnxruntime opens it, fails when run."""
    proto = _conv_bn([helper.make_node("Gather", ["bn", "idx"], ["y"], name="gather", axis=1)],
                     [_float_out()], [numpy_helper.from_array(np.array([10], np.int64), "idx")])
    path = tmp_path / "norun.onnx"
    onnx.save(proto, path)
    out = tmp_path / "o.onnx"
    result = run_main(capfd, path, "--pass", "fold-bn", "--calib", calib_npz(tmp_path),
                      "-o", out)
    assert_one_line_error(result, "onnxruntime cannot run", "gather")
    assert not out.exists()


@pytest.mark.parametrize("arrays, needle", [
    ({"x": np.array([["a", "b"]] * 8)}, "not numbers"),
    ({"x": np.zeros((8, 4, 8, 8), object)}, "allow_pickle"),  # pickles are never loaded
    ({"x": np.zeros((8, 4, 8, 8), np.float32), "labels": np.zeros((8, 2))}, "labels"),
    ({"x": np.zeros((8, 4, 8, 8), np.float32), "labels": np.array(["a"] * 8)}, "labels"),
])
def test_bad_calibration_arrays(tmp_path, capfd, arrays, needle):
    model = small_model(tmp_path)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    result = run_main(capfd, model, "--pass", "fold-bn", "--calib", path, "-o",
                      tmp_path / "o.onnx")
    assert_one_line_error(result, needle)


@pytest.mark.parametrize("init", ["refit", "whitened"])
def test_nan_calibration_with_fitting_inits(tmp_path, capfd, init):
    path = tmp_path / "b.onnx"
    from tests.builders import conv_model

    onnx.save(conv_model(["n", 16, 8, 8], 16, [3, 3], pads=[1] * 4, relu=True), path)
    x = np.random.default_rng(0).standard_normal((32, 16, 8, 8)).astype(np.float32)
    x[4, 1] = np.nan
    result = run_main(capfd, path, "--pass", f"bottleneck:init={init}", "--calib",
                      calib_npz(tmp_path, x=x), "-o", tmp_path / "o.onnx")
    assert_one_line_error(result, "NaN", "1 of 32 samples")


@pytest.mark.parametrize("key, value, needle", [
    ("location", "w\x00.data", "NUL"),
    ("offset", "1.5", "offset"),
    ("offset", "-3", "offset"),
    ("length", "abc", "length"),
    ("length", "١٢", "length"),  # unicode digits int() would take
])
def test_broken_external_data_entries(tmp_path, key, value, needle):
    path = external_model(tmp_path, "w.data")
    proto = onnx.load(str(path), load_external_data=False)
    entries = proto.graph.initializer[0].external_data
    found = [e for e in entries if e.key == key]
    if found:
        found[0].value = value
    else:
        entries.add(key=key, value=value)
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ModelLoadError, match=needle):
        rewriter.load(path)


def _full_disk(monkeypatch, suffix: str):
    """Writes of staged files for paths ending in `suffix` fail with ENOSPC."""
    real = atomic.stage_bytes

    def stage_bytes(path, data, *, label=None):
        if str(path).endswith(suffix):
            real_write = atomic._write_all

            def full(f, data):
                f.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(atomic, "_write_all", full)
            try:
                return real(path, data, label=label)
            finally:
                monkeypatch.setattr(atomic, "_write_all", real_write)
        return real(path, data, label=label)

    monkeypatch.setattr(atomic, "stage_bytes", stage_bytes)
    import rewriter.job

    monkeypatch.setattr(rewriter.job, "stage_bytes", stage_bytes)


@pytest.mark.parametrize("suffix", [".json", ".md", ".png"])
def test_full_disk_on_report_or_plot_writes_no_model(tmp_path, capfd, monkeypatch, suffix):
    pytest.importorskip("matplotlib")
    model = small_model(tmp_path)
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    _full_disk(monkeypatch, suffix)
    result = run_main(capfd, model, "--pass", "fold-bn", "-o", out / "o.onnx",
                      "--report", out / "r.json", "--report", out / "r.md",
                      "--plot", out / "p.png")
    assert_one_line_error(result, "No space left", "nothing written")
    assert not out.exists() or list(out.iterdir()) == []
    assert snapshot(tmp_path) == before


def test_report_and_plot_written_with_the_model(tmp_path, capfd):
    """Control: the same run without a full disk writes all four files."""
    pytest.importorskip("matplotlib")
    model = small_model(tmp_path)
    out = tmp_path / "out"
    result = run_main(capfd, model, "--pass", "fold-bn", "-o", out / "o.onnx",
                      "--report", out / "r.json", "--plot", out / "p.png")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "o.onnx", "p.png", "r.json"]
    assert (out / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("exc, needle", [
    (ValueError("boom"), "internal error: ValueError: boom"),
    (OSError(errno.EIO, "Input/output error"), "Input/output error"),
    (np.linalg.LinAlgError("Singular matrix"), "linear algebra failed"),
])
def test_last_resort_handler(tmp_path, capfd, monkeypatch, exc, needle):
    import rewriter.job

    def explode(*args, **kwargs):
        raise exc

    monkeypatch.setattr(rewriter.job, "run_job", explode)
    result = run_main(capfd, small_model(tmp_path), "--pass", "cleanup")
    assert_one_line_error(result, needle)
    monkeypatch.setenv("ONEXONE_DEBUG", "1")
    result = run_main(capfd, small_model(tmp_path), "--pass", "cleanup")
    assert result.returncode == 1 and "Traceback" in result.stderr
