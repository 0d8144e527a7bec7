"""Dynamic shapes: symbolic batch and spatial dims stay symbolic in every written model.

`--input-shape` fixes dims for analysis and for passes that need static shapes; the output model
must still accept any batch and (where the graph allows) any spatial size.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import rewriter
from rewriter.cli import main
from rewriter.shapes import infer_shapes, static_shape, with_input_shapes
from tests.conftest import ort_run

DYNAMIC = ["batch", 16, "h", "w"]


def dynamic_cnn(path, seed: int = 0):
    """x[batch,16,h,w] -> Conv3x3 32 -> Relu -> Conv3x3 32 -> Relu -> Conv1x1 8 -> y (dynamic)."""
    rng = np.random.default_rng(seed)

    def weight(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.2, name)

    inits = [weight("W1", (32, 16, 3, 3)), weight("W2", (32, 32, 3, 3)),
             weight("W3", (8, 32, 1, 1)), weight("B1", (32,))]
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Identity", ["r1"], ["i1"], name="ident"),
        helper.make_node("Conv", ["i1", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "W3"], ["y"], name="conv3"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, DYNAMIC)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, "h", "w"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def dims_of(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def assert_not_frozen(path) -> None:
    """Inputs/outputs keep their symbols, and the model runs at two different sizes."""
    proto = onnx.load(str(path))
    assert dims_of(proto.graph.input[0]) == DYNAMIC
    assert dims_of(proto.graph.output[0]) == ["batch", 8, "h", "w"]
    rng = np.random.default_rng(0)
    for shape in [(1, 16, 8, 8), (3, 16, 20, 12)]:
        (y,) = ort_run(path, {"x": rng.standard_normal(shape).astype(np.float32)})
        assert y.shape == (shape[0], 8, *shape[2:])


def test_load_keeps_symbols_and_infers_intermediates(tmp_path):
    model = rewriter.load(dynamic_cnn(tmp_path / "m.onnx"))
    values = {v.name: v for n in model.graph for v in n.outputs}
    # onnx cannot do arithmetic on symbols: spatial dims after a padded conv get fresh ones
    assert [str(d) for d in values["c2"].shape][:2] == ["batch", "32"]
    assert static_shape(values["c2"]) is None


@pytest.mark.parametrize("passes", [["cleanup"], ["cleanup", "bottleneck:ratio=0.5,round=1"]])
def test_rewrite_keeps_dims_symbolic(tmp_path, passes):
    result = rewriter.rewrite(rewriter.load(dynamic_cnn(tmp_path / "m.onnx")), passes,
                              input_shapes={"x": (1, 16, 12, 12)})
    assert sum(p.n_applied for p in result.report.passes) >= 1
    assert_not_frozen(rewriter.save(result.model, tmp_path / "out.onnx"))


def test_input_shape_never_freezes_cli_output(tmp_path, capfd):
    source = dynamic_cnn(tmp_path / "m.onnx")
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = main([str(source), "--pass", "cleanup", "--pass", "bottleneck:ratio=0.5,round=1",
                 "--input-shape", "x:2,16,24,24", "-o", str(out), "--report", str(report)])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert_not_frozen(out)
    data = json.loads(report.read_text())
    assert data["options"]["input_shapes"] == {"x": [2, 16, 24, 24]}
    assert data["macs_after"] < data["macs_before"]


def test_input_shape_only_for_analysis(tmp_path, capfd):
    source = dynamic_cnn(tmp_path / "m.onnx")
    assert main([str(source), "--analyze", "--json", "--input-shape", "x:1,16,32,32"]) == 0
    analysis = json.loads(capfd.readouterr().out)
    assert json.dumps(analysis)  # analysed at the given size ...
    assert dims_of(onnx.load(str(source)).graph.input[0]) == DYNAMIC  # ... input untouched


def test_with_input_shapes_returns_a_copy(tmp_path):
    model = rewriter.load(dynamic_cnn(tmp_path / "m.onnx"))
    fixed = with_input_shapes(model, {"x": (2, 16, 10, 10)})
    assert [str(d) for d in model.graph.inputs[0].shape] == ["batch", "16", "h", "w"]
    assert static_shape(fixed.graph.outputs[0]) == (2, 8, 10, 10)
    assert static_shape(model.graph.outputs[0]) is None


def test_unnamed_batch_defaults_to_one_for_analysis(tmp_path):
    fixed = with_input_shapes(rewriter.load(dynamic_cnn(tmp_path / "m.onnx")), {})
    assert str(fixed.graph.inputs[0].shape[0]) == "1"


def test_bad_input_shape_is_a_usage_error(tmp_path, capfd):
    source = dynamic_cnn(tmp_path / "m.onnx")
    code = main([str(source), "--analyze", "--input-shape", "nope:1,2"])
    captured = capfd.readouterr()
    assert code == 2
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown inputs" in lines[0]
    for spec, needle in [("x:1,a", "integers"), ("x:1,16,8", "3 dims given"),
                         ("x:1,3,8,8", "dim 1 is fixed to 16")]:
        code = main([str(source), "--analyze", "--input-shape", spec])
        err = capfd.readouterr().err
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_reinference_clears_stale_shapes(tmp_path):
    """A pass that changes channel counts must not leave the old intermediate shapes behind."""
    model = rewriter.load(dynamic_cnn(tmp_path / "m.onnx"))
    conv2 = next(n for n in model.graph if n.name == "conv2")
    conv2.outputs[0].shape = ir.Shape([1, 999, 1, 1])
    assert infer_shapes(model) is None
    assert [str(d) for d in conv2.outputs[0].shape][:2] == ["batch", "32"]


def test_frozen_output_would_be_caught(tmp_path):
    """Control for assert_not_frozen: a model with fixed dims fails it."""
    proto = onnx.load(str(dynamic_cnn(tmp_path / "m.onnx")))
    for dim, value in zip(proto.graph.input[0].type.tensor_type.shape.dim, [1, 16, 8, 8],
                          strict=True):
        dim.dim_value = value
    onnx.save(proto, tmp_path / "frozen.onnx")
    with pytest.raises(AssertionError):
        assert_not_frozen(tmp_path / "frozen.onnx")
