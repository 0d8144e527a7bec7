"""The rewritten model run forward group by group: each run starts from the values the last
one held, a value whose producer changed is recomputed, and every value is what a run of the
whole model gives."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import helper, numpy_helper

from rewriter import load, runtime
from rewriter.forward import ForwardValues
from rewriter.graph import new_initializer


def _chain(skip: bool = False) -> ir.Model:
    """conv0 -> relu0 -> conv1 -> relu1 -> conv2 (+ relu0 as a skip into an Add with skip)."""
    rng = np.random.default_rng(3)
    nodes, inits, prev = [], [], "x"
    for i in range(3):
        inits.append(numpy_helper.from_array(
            (rng.standard_normal((8, 8, 3, 3)) / np.sqrt(72)).astype(np.float32), f"W{i}"))
        nodes.append(helper.make_node("Conv", [prev, f"W{i}"], [f"c{i}"], name=f"conv{i}",
                                      pads=[1] * 4))
        if i < 2:
            nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
            prev = f"r{i}"
    last = "c2"
    if skip:
        nodes.append(helper.make_node("Add", ["c2", "r0"], ["y"], name="add"))
        last = "y"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, ["N", 8, 6, 6])],
                              [helper.make_tensor_value_info(last, 1, ["N", 8, 6, 6])], inits)
    return load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _inputs(n: int = 10) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(4).standard_normal((n, 8, 6, 6)).astype(np.float32)}


def _whole(model: ir.Model, names: list[str], inputs) -> dict[str, np.ndarray]:
    batches = list(runtime.capture(model, names, inputs))
    return {name: np.concatenate([b[name] for b in batches]) for name in names}


def _sessions(monkeypatch) -> list[int]:
    """Node counts of the models the forward runs open sessions on."""
    import rewriter.forward as forward

    counts: list[int] = []
    real = forward.runtime.make_session

    def counted(model, **kwargs):
        counts.append(len(list(model.graph)))
        return real(model, **kwargs)

    monkeypatch.setattr(forward.runtime, "make_session", counted)
    return counts


def test_each_run_starts_from_the_held_frontier_and_matches_the_whole_model(monkeypatch):
    model, inputs = _chain(skip=True), _inputs()
    expected = _whole(model, ["r0", "r1", "c2"], inputs)
    counts = _sessions(monkeypatch)
    forward = ForwardValues(model, inputs, batch_size=4)
    got = {**forward.values(["r0"]), **forward.values(["r1"]), **forward.values(["c2"])}
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    assert counts == [2, 2, 1]  # conv0+relu0, then conv1+relu1 from r0, then conv2 from r1
    assert forward.values(["r0"])["r0"] is got["r0"]  # the skip into Add is still held
    assert forward.runs == 3


def test_a_value_whose_producer_changed_is_recomputed(monkeypatch):
    """A merge rewrites the conv producing a held value: it is dropped, and the next run goes
    back as far as it must (here the inputs: r0 was read by nothing left to run)."""
    model, inputs = _chain(), _inputs()
    forward = ForwardValues(model, inputs, batch_size=4)
    forward.values(["r0"])
    forward.values(["c1"])
    conv1 = next(n for n in model.graph if n.name == "conv1")
    w = conv1.inputs[1].const_value.numpy()
    conv1.replace_input_with(1, new_initializer(model.graph, "W1_changed", 2 * w))
    expected = _whole(model, ["r1"], inputs)["r1"]
    counts = _sessions(monkeypatch)
    got = forward.values(["r1"])
    np.testing.assert_allclose(got["r1"], expected, rtol=1e-6)
    assert counts == [4]  # conv0, relu0, the changed conv1, relu1


def test_without_budget_nothing_is_held_and_every_run_starts_at_the_inputs(monkeypatch):
    model, inputs = _chain(), _inputs()
    expected = _whole(model, ["r0", "r1"], inputs)
    counts = _sessions(monkeypatch)
    forward = ForwardValues(model, inputs, batch_size=4, budget=0)
    got = {**forward.values(["r0"]), **forward.values(["r1"])}
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    assert counts == [2, 4]


def test_a_shape_is_recomputed_not_held_and_sliced():
    """A Shape read later (its type unknown, as an export without value_info leaves it) is not
    data with a row per sample: it is recomputed where needed, never held and fed back in
    batch slices, and every value comes out as the whole model computes it."""
    rng = np.random.default_rng(6)
    w = (rng.standard_normal((4, 4, 3, 3)) / 6).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c0"], pads=[1] * 4, name="conv0"),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Shape", ["r0"], ["s"], name="shape"),
             helper.make_node("Reshape", ["r0", "s"], ["r0b"], name="reshape0"),
             helper.make_node("Conv", ["r0b", "W"], ["c1"], pads=[1] * 4, name="conv1"),
             helper.make_node("Reshape", ["c1", "s"], ["y"], name="reshape")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, ["N", 4, 2, 2])],
                              [helper.make_tensor_value_info("y", 1, ["N", 4, 2, 2])],
                              [numpy_helper.from_array(w, "W")])
    model = load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    shape = next(n for n in model.graph if n.name == "shape").outputs[0]
    shape.type = None
    inputs = {"x": rng.standard_normal((4, 4, 2, 2)).astype(np.float32)}  # 4 samples, 4 dims
    expected = _whole(model, ["c1", "y"], inputs)
    forward = ForwardValues(model, inputs, batch_size=2)
    got = {**forward.values(["c1"]), **forward.values(["y"])}  # s is read again by the last
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
