"""Smaller holes from the review: local-function external data, the guard's silence on
dynamic or integer inputs, fold-bn across an If, deepen on IR 3, library log lines."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import rewriter
from rewriter.errors import ModelLoadError
from tests.builders import conv_model, make_model
from tests.conftest import ort_run


def _function_model(folder, location: str):
    """main: y = F(x); local function F: y = x + c, c a Constant whose tensor is external."""
    tensor = TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[4],
                         data_location=TensorProto.EXTERNAL)
    tensor.external_data.add(key="location", value=location)
    tensor.external_data.add(key="offset", value="0")
    tensor.external_data.add(key="length", value="16")
    function = helper.make_function(
        "local", "AddConst", ["x"], ["y"],
        [helper.make_node("Constant", [], ["c"], value=tensor),
         helper.make_node("Add", ["x", "c"], ["y"])],
        [helper.make_opsetid("", 17)])
    graph = helper.make_graph(
        [helper.make_node("AddConst", ["x"], ["y"], domain="local", name="f")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", 17),
                                             helper.make_opsetid("local", 1)])
    model.ir_version = 8
    path = folder / "f.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_function_constant_outside_folder_refused(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "secret.data").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        rewriter.load(_function_model(tmp_path / "model", "../secret.data"))


def test_function_constant_resolved_against_model_folder(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "c.data").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "c.data").write_bytes(np.full(4, 99, np.float32).tobytes())  # must not be read
    path = _function_model(folder, "c.data")
    monkeypatch.chdir(elsewhere)
    model = rewriter.load(path)
    function = next(iter(model.functions.values()))
    constant = next(n for n in function if n.op_type == "Constant")
    np.testing.assert_array_equal(constant.attributes["value"].value.numpy(), np.arange(4))


def _dynamic_conv_bn(path, *, dtype=TensorProto.FLOAT):
    """x[n,4,h,w] -> [Cast] -> Conv -> BN -> y."""
    rng = np.random.default_rng(0)
    arrays = {"W": rng.standard_normal((4, 4, 3, 3)).astype(np.float32),
              "s": rng.uniform(0.5, 1.5, 4).astype(np.float32),
              "b": rng.standard_normal(4).astype(np.float32),
              "m": rng.standard_normal(4).astype(np.float32),
              "v": rng.uniform(0.5, 1.5, 4).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["xf", "W"], ["c"], name="conv", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn")]
    if dtype == TensorProto.FLOAT:
        nodes.insert(0, helper.make_node("Identity", ["x"], ["xf"], name="id"))
        shape = ["n", 4, "h", "w"]
    else:
        nodes.insert(0, helper.make_node("Cast", ["x"], ["xf"], name="cast", to=1))
        shape = ["n", 4, 8, 8]
    model = make_model(nodes, [helper.make_tensor_value_info("x", dtype, shape)],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                       [numpy_helper.from_array(a, k) for k, a in arrays.items()])
    onnx.save(model, path)
    return path


def test_guard_says_when_it_is_off_and_runs_at_given_shapes(tmp_path):
    path = _dynamic_conv_bn(tmp_path / "dyn.onnx")
    result = rewriter.rewrite(rewriter.load(path), ["fold-bn"])
    assert any("numerical guard off" in w for w in result.report.warnings)
    assert "guard_rel_l2" not in result.report.passes[0].metrics
    result = rewriter.rewrite(rewriter.load(path), ["fold-bn"],
                              input_shapes={"x": (1, 4, 8, 8)})
    assert not any("numerical guard off" in w for w in result.report.warnings)
    assert result.report.passes[0].metrics["guard_rel_l2"] < 1e-4


def test_guard_runs_on_integer_inputs(tmp_path):
    path = _dynamic_conv_bn(tmp_path / "int.onnx", dtype=TensorProto.INT64)
    result = rewriter.rewrite(rewriter.load(path), ["fold-bn"])
    assert not any("numerical guard off" in w for w in result.report.warnings)
    assert result.report.passes[0].metrics["guard_rel_l2"] < 1e-4


def test_fold_bn_with_conv_outside_if_and_bn_inside(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"W": rng.standard_normal((4, 4, 3, 3)).astype(np.float32),
              "s": rng.uniform(0.5, 1.5, 4).astype(np.float32),
              "b": rng.standard_normal(4).astype(np.float32),
              "m": rng.standard_normal(4).astype(np.float32),
              "v": rng.uniform(0.5, 1.5, 4).astype(np.float32)}
    out_info = helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 4, 8, 8])
    then = helper.make_graph(
        [helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["r"], name="bn")],
        "then", [], [out_info])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["r"], name="pass")],
                              "else", [], [out_info])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1] * 4),
         helper.make_node("If", ["flag"], ["y"], name="if", then_branch=then, else_branch=other)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8]),
              helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(a, k) for k, a in arrays.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = tmp_path / "if.onnx"
    onnx.save(proto, path)
    result = rewriter.rewrite(rewriter.load(path), ["fold-bn"])
    assert result.report.passes[0].n_applied == 1 and result.discarded == []
    out = rewriter.save(result.model, tmp_path / "o.onnx")
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    for flag in (True, False):
        feeds = {"x": x, "flag": np.array(flag)}
        np.testing.assert_allclose(ort_run(out, feeds)[0], ort_run(path, feeds)[0],
                                   rtol=1e-4, atol=1e-5)


def test_deepen_on_ir3_model(tmp_path):
    proto = conv_model([1, 4, 8, 8], 8, [3, 3], pads=[1] * 4, relu=True)
    for init in proto.graph.initializer:  # IR 3: every initializer is also a graph input
        proto.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type,
                                                               list(init.dims)))
    del proto.opset_import[:]
    proto.opset_import.append(helper.make_opsetid("", 8))
    proto.ir_version = 3
    path = tmp_path / "ir3.onnx"
    onnx.save(proto, path)
    result = rewriter.rewrite(rewriter.load(path), ["deepen"])
    assert result.report.passes[0].n_applied == 1
    out = rewriter.save(result.model, tmp_path / "o.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    x = {"x": np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(out, x)[0], ort_run(path, x)[0], rtol=1e-5, atol=1e-6)


def test_onnx_ir_log_lines_silenced(capfd):
    from rewriter.lastresort import quiet_libraries

    logging.basicConfig()
    with quiet_libraries():
        logging.getLogger("onnx_ir.passes.common").warning("Skipped deduplication of x")
    assert "Skipped deduplication" not in capfd.readouterr().err
