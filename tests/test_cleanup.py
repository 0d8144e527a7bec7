"""cleanup: Identity/Dropout removal, duplicate initializers, dead code; outputs and names kept."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.builders import make_model
from tests.passcheck import assert_same_outputs, random_feeds, run_pass

X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])


def _out(name: str = "y") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def _const(name: str, value: float, shape=(2, 4)) -> onnx.TensorProto:
    return numpy_helper.from_array(np.full(shape, value, np.float32), name)


def test_identity_and_dropout_removed_outputs_unchanged():
    nodes = [
        helper.make_node("Identity", ["x"], ["i1"], name="id1"),
        helper.make_node("Relu", ["i1"], ["r"], name="relu"),
        helper.make_node("Dropout", ["r"], ["d"], name="drop"),
        helper.make_node("Identity", ["d"], ["y"], name="id_out"),
    ]
    proto = make_model(nodes, [X], [_out()])
    model, report = run_pass(proto, "cleanup")
    assert [n.op_type for n in model.graph] == ["Relu"]
    assert [v.name for v in model.graph.outputs] == ["y"]
    removed = {d.node for d in report.decisions if d.applied}
    assert {"id1", "drop", "id_out"} <= removed
    assert_same_outputs(proto, model, random_feeds(proto), 0.0)


def test_identity_from_graph_input_to_output_is_kept():
    proto = make_model([helper.make_node("Identity", ["x"], ["y"], name="copy")], [X], [_out()])
    model, report = run_pass(proto, "cleanup")
    assert [n.op_type for n in model.graph] == ["Identity"]
    assert not report.decisions[0].applied and "graph input" in report.decisions[0].reason


def test_identity_between_two_graph_outputs_keeps_both_names():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Identity", ["a"], ["b"], name="copy")]
    proto = make_model(nodes, [X], [_out("a"), _out("b")])
    model, _ = run_pass(proto, "cleanup")
    assert [v.name for v in model.graph.outputs] == ["a", "b"]
    assert_same_outputs(proto, model, random_feeds(proto), 0.0)


def test_dropout_in_training_mode_or_with_used_mask_is_kept():
    inits = [numpy_helper.from_array(np.array(True), "train"),
             numpy_helper.from_array(np.array(0.5, np.float32), "ratio")]
    nodes = [
        helper.make_node("Dropout", ["x", "ratio", "train"], ["d"], name="train_drop"),
        helper.make_node("Dropout", ["d"], ["e", "mask"], name="mask_drop"),
        helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Add", ["e", "m"], ["y"], name="add"),
    ]
    proto = make_model(nodes, [X], [_out()], inits)
    _, report = run_pass(proto, "cleanup")
    reasons = {d.node: d.reason for d in report.decisions if not d.applied}
    assert "training mode" in reasons["train_drop"]
    assert "mask" in reasons["mask_drop"]


def test_duplicates_merged_dead_code_dropped():
    inits = [_const("w1", 2.0), _const("w2", 2.0), _const("unused", 7.0)]
    nodes = [
        helper.make_node("Mul", ["x", "w1"], ["a"], name="mul1"),
        helper.make_node("Mul", ["a", "w2"], ["y"], name="mul2"),
        helper.make_node("Relu", ["x"], ["dead"], name="dead_relu"),
    ]
    proto = make_model(nodes, [X], [_out()], inits)
    model, report = run_pass(proto, "cleanup")
    assert sorted(model.graph.initializers) == ["w1"]
    assert [n.name for n in model.graph] == ["mul1", "mul2"]
    reasons = {d.node: d.reason for d in report.decisions}
    assert reasons["w2"] == "duplicate initializer merged"
    assert reasons["unused"] == "unused initializer removed"
    assert reasons["dead_relu"] == "dead node removed"
    assert_same_outputs(proto, model, random_feeds(proto), 0.0)


def test_outer_scope_values_used_in_subgraphs_are_kept():
    """`w` and `r` are read only inside the If branches: they are uses, not dead code."""
    then_graph = helper.make_graph(
        [helper.make_node("Add", ["r", "w"], ["t"], name="then_add")], "then", [], [_out("t")])
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["e"], name="else_copy"),
         helper.make_node("Mul", ["r", "e"], ["f"], name="else_mul")], "else", [], [_out("f")])
    cond = numpy_helper.from_array(np.array(True), "cond")
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_graph,
                         else_branch=else_graph),
    ]
    proto = make_model(nodes, [X], [_out()], [_const("w", 3.0), cond])
    model, report = run_pass(proto, "cleanup")
    assert "w" in model.graph.initializers
    assert [n.name for n in model.graph] == ["relu", "if"]
    assert {d.node for d in report.decisions if d.applied} == {"else_copy"}
    assert_same_outputs(proto, model, random_feeds(proto), 0.0)


def test_nothing_to_do_is_said():
    proto = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [X], [_out()])
    model, report = run_pass(proto, "cleanup")
    assert report.n_applied == 0 and report.notes
