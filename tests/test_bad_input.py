"""Broken models: the CLI exits 1 with one stderr line naming the problem; the API raises.

Every case goes through both `rewrite X --analyze` (and `--pass cleanup` for a sample) and
`rewriter.load`, so neither path can regress to a traceback.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import rewriter
from rewriter.cli import main
from rewriter.errors import ModelLoadError
from tests.builders import conv_model
from tests.conftest import ROOT, rapidocr_model


def rewrite_cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the installed `rewrite` command (falls back to `python -m rewriter.cli`)."""
    exe = ROOT / ".venv" / "bin" / "rewrite"
    if exe.exists():
        cmd = [str(exe)]
    elif shutil.which("rewrite"):
        cmd = [shutil.which("rewrite")]
    else:
        cmd = [sys.executable, "-m", "rewriter.cli"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def assert_one_line_error(
    result: subprocess.CompletedProcess, *needles: str, code: int = 1
) -> str:
    """Exit code `code` (1), exactly one non-empty stderr line, mentioning every needle."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, result.stderr
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("rewrite: error:"), line
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle.lower() in line.lower(), line
    return line


def assert_rejected(path: Path, *needles: str, with_pass: bool = False) -> None:
    """The CLI (analysis, and optionally a pass) and the API both refuse the file."""
    assert_one_line_error(rewrite_cli(path, "--analyze"), *needles)
    if with_pass:
        out = path.with_name("never-written.onnx")
        assert_one_line_error(rewrite_cli(path, "--pass", "cleanup", "-o", out), *needles)
        assert not out.exists()
    with pytest.raises(ModelLoadError) as info:
        rewriter.load(path)
    for needle in needles:
        assert needle.lower() in str(info.value).lower()


def write(tmp_path: Path, name: str, data: bytes | onnx.ModelProto) -> Path:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.SerializeToString())
    return path


# ------------------------------------------------------------------------ not a model at all


def test_missing_file(tmp_path):
    assert_rejected(tmp_path / "nope.onnx", "no such file")


def test_empty_file(tmp_path):
    assert_rejected(write(tmp_path, "empty.onnx", b""), "empty")


def test_directory(tmp_path):
    (tmp_path / "dir.onnx").mkdir()
    assert_rejected(tmp_path / "dir.onnx", "directory")


def test_random_bytes(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert_rejected(write(tmp_path, "random.onnx", data), "not an ONNX model", with_pass=True)


def test_random_bytes_many_seeds():
    """Random bytes sometimes parse as a protobuf; they must still be refused (API only: fast)."""
    rng = np.random.default_rng(1)
    for size in (1, 2, 7, 64, 1000):
        for _ in range(20):
            data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            with pytest.raises(ModelLoadError):
                rewriter.load(data)


def test_text_file(tmp_path):
    assert_rejected(write(tmp_path, "readme.onnx", b"this is not a model\n" * 10), "ONNX model")


@pytest.mark.parametrize("kind", ["tensor", "graph", "node"])
def test_protobuf_that_is_not_a_model(tmp_path, kind):
    """Valid protobufs of the wrong message type (what a mixed-up file would hold)."""
    tensor = numpy_helper.from_array(np.ones((2, 3), np.float32), "t")
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    message = {"tensor": tensor, "graph": graph, "node": node}[kind]
    assert_rejected(write(tmp_path, f"{kind}.onnx", message.SerializeToString()), "ONNX model")


# -------------------------------------------------------------------------------- truncation


def _truncation_points(size: int) -> list[int]:
    return [size * k // 16 for k in range(1, 16)]


@pytest.mark.parametrize("kind", ["cls", "det", "rec"])
def test_truncated_real_model_cli(tmp_path, capfd, kind):
    """Every 1/16th of a shipped PP-OCR model: exit 1 and one line, never a traceback.

    Runs the CLI's `main` in-process (fd-level capture, so native library output counts too);
    `test_truncated_model_with_pass` covers the installed command itself.
    """
    data = rapidocr_model(kind).read_bytes()
    for cut in _truncation_points(len(data)):
        path = write(tmp_path, f"{kind}-{cut}.onnx", data[:cut])
        code = main([str(path), "--analyze"])
        captured = capfd.readouterr()
        result = subprocess.CompletedProcess([], code, captured.out, captured.err)
        assert_one_line_error(result, str(path))


@pytest.mark.parametrize("kind", ["cls", "det", "rec"])
def test_truncated_real_model_api(kind):
    data = rapidocr_model(kind).read_bytes()
    for cut in _truncation_points(len(data)):
        with pytest.raises(ModelLoadError, match="not an ONNX model or truncated|invalid ONNX"):
            rewriter.load(data[:cut])


def test_truncated_zoo_model(zoo):
    data = zoo("convnet").read_bytes()
    for cut in _truncation_points(len(data)):
        with pytest.raises(ModelLoadError):
            rewriter.load(data[:cut])


def test_truncated_model_with_pass(tmp_path):
    data = rapidocr_model("cls").read_bytes()
    assert_rejected(write(tmp_path, "half.onnx", data[: len(data) // 2]), "truncated",
                    with_pass=True)


# ---------------------------------------------------------------------------- invalid graphs


def _graph_model(nodes, inits=(), inputs=None, outputs=None) -> onnx.ModelProto:
    """A model built without shape inference (so broken graphs stay broken)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])
    graph = helper.make_graph(nodes, "g", inputs or [x], outputs or [y], initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _weight(shape, name="W") -> onnx.TensorProto:
    rng = np.random.default_rng(0)
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def test_dangling_input(tmp_path):
    model = _graph_model([helper.make_node("Add", ["x", "ghost"], ["y"], name="add")])
    assert_rejected(write(tmp_path, "dangling.onnx", model), "ghost")


def test_cycle(tmp_path):
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="first"),
             helper.make_node("Relu", ["a"], ["b"], name="second"),
             helper.make_node("Identity", ["a"], ["y"], name="out")]
    assert_rejected(write(tmp_path, "cycle.onnx", _graph_model(nodes)), "invalid ONNX graph")


def test_duplicate_output_names(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="one"),
             helper.make_node("Sigmoid", ["x"], ["y"], name="two")]
    assert_rejected(write(tmp_path, "dup.onnx", _graph_model(nodes)), "'y'")


def test_missing_conv_weight_initializer(tmp_path):
    model = _graph_model([helper.make_node("Conv", ["x", "W"], ["y"], name="conv")])
    assert_rejected(write(tmp_path, "noweight.onnx", model), "W", with_pass=True)


def test_conv_weight_shape_mismatch(tmp_path):
    """W says 3 input channels, x has 4: shape inference must refuse it by name."""
    model = _graph_model([helper.make_node("Conv", ["x", "W"], ["y"], name="conv",
                                           pads=[1, 1, 1, 1])], [_weight((4, 3, 3, 3))])
    assert_rejected(write(tmp_path, "mismatch.onnx", model), "conv", "'W'", "input channels",
                    with_pass=True)


def test_conv_bias_shape_mismatch(tmp_path):
    model = _graph_model([helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv",
                                           pads=[1, 1, 1, 1])],
                         [_weight((4, 4, 3, 3)), _weight((5,), "B")])
    assert_rejected(write(tmp_path, "bias.onnx", model), "bias 'B'")


def test_conv_weight_rank_mismatch(tmp_path):
    model = _graph_model([helper.make_node("Conv", ["x", "W"], ["y"], name="conv")],
                         [_weight((4, 4, 3))])
    path = write(tmp_path, "rank.onnx", model)
    assert_rejected(path, "node name: conv")
    with pytest.raises(ModelLoadError) as info:
        rewriter.load(path)
    message = str(info.value).lower()  # onnx's wording changed across versions
    assert "weight tensor" in message or "differ in rank" in message, message


def test_weight_bytes_do_not_match_dims(tmp_path):
    """The tensor header promises 4x4x3x3 floats but raw_data holds fewer bytes."""
    weight = _weight((4, 4, 3, 3))
    weight.raw_data = weight.raw_data[:100]
    model = _graph_model([helper.make_node("Conv", ["x", "W"], ["y"], name="conv",
                                           pads=[1, 1, 1, 1])], [weight])
    assert_rejected(write(tmp_path, "short.onnx", model), "initializer 'W'")


def test_unknown_standard_op(tmp_path):
    model = _graph_model([helper.make_node("NotAnOp", ["x"], ["y"], name="mystery")])
    assert_rejected(write(tmp_path, "unknown.onnx", model), "NotAnOp")


def test_missing_opset_import_for_domain(tmp_path):
    model = _graph_model([helper.make_node("Frob", ["x"], ["y"], name="f", domain="my.domain")])
    assert_rejected(write(tmp_path, "nodomain.onnx", model), "my.domain")


def test_valid_model_still_loads(tmp_path):
    """Control: the builders' valid model passes the same CLI path (exit 0)."""
    path = write(tmp_path, "ok.onnx", conv_model([1, 4, 8, 8], 8, [3, 3]))
    assert rewrite_cli(path, "--analyze").returncode == 0
