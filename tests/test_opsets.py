"""Opsets and domains: the zoo at opsets 11, 13, 17 and the newest the exporter (and onnx)
support round-trips and rewrites; custom and contrib ops pass through untouched; passes reach
into If/Loop subgraphs where they apply and outer-scope references survive.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnx.version_converter
import pytest
from onnx import TensorProto, helper, numpy_helper

import rewriter
from models.export import MAX_EXPORT_OPSET
from tests.conftest import ort_run
from tests.modelcheck import assert_bit_identical, assert_valid, seeded_feeds

OPSETS = [11, 13, 17, MAX_EXPORT_OPSET]
SMALL_ZOO = ["convnet", "convnet_gap", "inception3a", "mobilenetv2"]
HAS_BOTTLENECK = importlib.util.find_spec("rewriter.passes.bottleneck") is not None


def opsets_of(path) -> dict[str, int]:
    return {o.domain or "": o.version for o in onnx.load(str(path)).opset_import}


def rewrite_and_check(source, out, passes, *, exact: bool) -> None:
    """Rewrite, save, and check: valid, same opsets, same outputs (exact) or same shapes."""
    result = rewriter.rewrite(rewriter.load(source), passes)
    assert result.discarded == []
    written = rewriter.save(result.model, out)
    feeds = seeded_feeds(onnx.load(str(source)), seed=7)
    before, after = ort_run(source, feeds), assert_valid(written, feeds)
    assert opsets_of(written) == opsets_of(source)
    for a, b in zip(before, after, strict=True):
        assert a.shape == b.shape
        if exact:
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("name", SMALL_ZOO)
def test_zoo_round_trip_at_opset(zoo, tmp_path, name, opset):
    source = zoo(name, opset)
    assert opsets_of(source)[""] == opset
    written = rewriter.save(rewriter.load(source), tmp_path / "rt.onnx")
    feeds = seeded_feeds(onnx.load(str(source)), seed=7)
    assert_bit_identical(ort_run(source, feeds), assert_valid(written, feeds))
    assert opsets_of(written) == opsets_of(source)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("name", SMALL_ZOO)
def test_zoo_cleanup_at_opset(zoo, tmp_path, name, opset):
    rewrite_and_check(zoo(name, opset), tmp_path / "out.onnx", ["cleanup"], exact=True)


@pytest.mark.skipif(not HAS_BOTTLENECK, reason="rewriter.passes.bottleneck not importable")
@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("name", ["convnet", "inception3a"])
def test_zoo_bottleneck_at_opset(zoo, tmp_path, name, opset):
    rewrite_and_check(zoo(name, opset), tmp_path / "out.onnx",
                      ["cleanup", "bottleneck:ratio=0.5,round=1"], exact=False)


@pytest.mark.slow
@pytest.mark.parametrize("opset", [11, MAX_EXPORT_OPSET])
@pytest.mark.parametrize("name", ["googlenet", "resnet50"])
def test_big_zoo_cleanup_at_opset(zoo, tmp_path, name, opset):
    rewrite_and_check(zoo(name, opset), tmp_path / "out.onnx", ["cleanup"], exact=True)


def test_newest_runnable_opset(zoo, tmp_path):
    """The zoo up-converted to the newest opset both the installed onnx and onnxruntime run
    (onnxruntime lags onnx by a few opsets; the exporter stops at MAX_EXPORT_OPSET)."""
    exported = onnx.load(str(zoo("convnet_gap")))
    source = tmp_path / "newest.onnx"
    for opset in range(onnx.defs.onnx_opset_version(), MAX_EXPORT_OPSET, -1):
        onnx.save(onnx.version_converter.convert_version(exported, opset), source)
        try:
            ort_run(source, seeded_feeds(exported))
        except Exception:  # not yet supported by this onnxruntime: try one older
            continue
        break
    else:
        pytest.skip(f"onnxruntime runs no opset above {MAX_EXPORT_OPSET}")
    assert opsets_of(source)[""] > MAX_EXPORT_OPSET
    rewrite_and_check(source, tmp_path / "out.onnx", ["cleanup"], exact=True)
    if HAS_BOTTLENECK:
        rewrite_and_check(source, tmp_path / "out2.onnx", ["bottleneck:ratio=0.5,round=1"],
                          exact=False)


# ------------------------------------------------------------------------ custom and contrib


def _weight(rng, name, shape):
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)


def mixed_domain_model() -> onnx.ModelProto:
    """Conv -> Identity -> com.microsoft FusedConv -> my.domain Frobnicate -> Relu."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["a"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Identity", ["a"], ["b"], name="ident"),
        helper.make_node("FusedConv", ["b", "W2"], ["c"], name="fused", domain="com.microsoft",
                         activation="Relu", pads=[1, 1, 1, 1]),
        helper.make_node("Frobnicate", ["c"], ["d"], name="custom", domain="my.domain",
                         alpha=0.5),
        helper.make_node("Relu", ["d"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])],
        [_weight(rng, "W1", (8, 8, 3, 3)), _weight(rng, "W2", (8, 8, 3, 3))])
    model = helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
        helper.make_opsetid("my.domain", 1)])
    model.ir_version = 8
    return model


def test_custom_and_contrib_ops_pass_through(tmp_path):
    source = tmp_path / "mixed.onnx"
    onnx.save(mixed_domain_model(), source)
    result = rewriter.rewrite(rewriter.load(source), ["cleanup"])
    assert any("guard off" in w for w in result.report.warnings)  # ORT lacks my.domain
    written = rewriter.save(result.model, tmp_path / "out.onnx")
    onnx.checker.check_model(str(written), full_check=True)
    before, after = onnx.load(str(source)), onnx.load(str(written))
    by_name = {n.name: n for n in after.graph.node}
    assert "ident" not in by_name  # cleanup did its job around the foreign ops ...
    for name in ("fused", "custom"):  # ... and left them exactly as they were, bar the input
        original = next(n for n in before.graph.node if n.name == name)
        assert by_name[name].attribute == original.attribute
        assert (by_name[name].domain, by_name[name].op_type) == (original.domain,
                                                                 original.op_type)
    assert opsets_of(written) == opsets_of(source)


def test_contrib_op_rewrite_keeps_outputs(tmp_path):
    """Without the custom op, onnxruntime runs it: cleanup keeps outputs exactly."""
    proto = mixed_domain_model()
    del proto.graph.node[3]
    proto.graph.node[3].input[0] = "c"
    del proto.opset_import[2]
    source = tmp_path / "contrib.onnx"
    onnx.save(proto, source)
    rewrite_and_check(source, tmp_path / "out.onnx", ["cleanup"], exact=True)


# ------------------------------------------------------------------------------ subgraphs


def _bn_inits(rng, prefix: str, channels: int) -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32), f"{prefix}s"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), f"{prefix}b"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), f"{prefix}m"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, channels).astype(np.float32), f"{prefix}v"),
    ]


def if_loop_model(shared: bool = False) -> onnx.ModelProto:
    """If(cond): then = Conv(x, Wt outer) -> BN (inner) -> Identity; else = Relu(x).
    Then a Loop (2 trips) whose body is Conv(state, W outer) -> Identity -> Relu.
    With `shared`, the then-branch Conv reads the Loop's W too."""
    rng = np.random.default_rng(1)
    info = helper.make_tensor_value_info
    shape = [1, 4, 5, 5]
    then_graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W" if shared else "Wt"], ["t1"], name="then_conv",
                          pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["t1", "bn_s", "bn_b", "bn_m", "bn_v"], ["t2"],
                          name="then_bn"),
         helper.make_node("Identity", ["t2"], ["then_y"], name="then_ident")],
        "then", [], [info("then_y", TensorProto.FLOAT, shape)], _bn_inits(rng, "bn_", 4))
    else_graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["else_y"], name="else_relu")],
        "else", [], [info("else_y", TensorProto.FLOAT, shape)])
    body = helper.make_graph(
        [helper.make_node("Conv", ["state", "W"], ["l1"], name="loop_conv", pads=[1, 1, 1, 1]),
         helper.make_node("Identity", ["l1"], ["l2"], name="loop_ident"),
         helper.make_node("Relu", ["l2"], ["state_out"], name="loop_relu"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="loop_cond")],
        "body",
        [info("iter", TensorProto.INT64, []), info("cond_in", TensorProto.BOOL, []),
         info("state", TensorProto.FLOAT, shape)],
        [info("cond_out", TensorProto.BOOL, []), info("state_out", TensorProto.FLOAT, shape)])
    nodes = [
        helper.make_node("If", ["cond"], ["branch"], name="branch", then_branch=then_graph,
                         else_branch=else_graph),
        helper.make_node("Loop", ["trips", "", "branch"], ["y"], name="loop", body=body),
    ]
    inits = [_weight(rng, "W", (4, 4, 3, 3)), _weight(rng, "Wt", (4, 4, 3, 3)),
             numpy_helper.from_array(np.array(2, np.int64), "trips")]
    graph = helper.make_graph(nodes, "g", [info("cond", TensorProto.BOOL, []),
                                           info("x", TensorProto.FLOAT, shape)],
                              [info("y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _subgraph_nodes(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    found = {}

    def walk(graph):
        for node in graph.node:
            found[node.name] = node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)

    walk(proto.graph)
    return found


@pytest.mark.parametrize("passes", [["cleanup"], ["cleanup", "fold-bn"]])
def test_passes_reach_into_if_and_loop(tmp_path, passes):
    source = tmp_path / "ifloop.onnx"
    onnx.save(if_loop_model(), source)
    result = rewriter.rewrite(rewriter.load(source), passes)
    assert result.discarded == []
    written = rewriter.save(result.model, tmp_path / "out.onnx")
    after = _subgraph_nodes(onnx.load(str(written)))
    assert "then_ident" not in after and "loop_ident" not in after
    assert "loop_cond" in after or "cond_out" in {o for n in after.values() for o in n.output}
    if "fold-bn" in passes:
        assert "then_bn" not in after
    # outer-scope references survive: the subgraphs still read the main graph's W and x
    assert after["loop_conv"].input[1] == "W"
    assert after["else_relu"].input[0] == "x" and after["then_conv"].input[0] == "x"
    x = np.random.default_rng(2).standard_normal((1, 4, 5, 5)).astype(np.float32)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": x}
        (want,), (got,) = ort_run(source, feeds), assert_valid(written, feeds)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_weight_shared_across_subgraphs_is_left_alone(tmp_path):
    """then_conv and loop_conv share W: folding BN into it would change the Loop too."""
    source = tmp_path / "shared.onnx"
    onnx.save(if_loop_model(shared=True), source)
    result = rewriter.rewrite(rewriter.load(source), ["fold-bn"])
    (decision,) = result.report.passes[0].decisions
    assert not decision.applied and "shared" in decision.reason
    written = rewriter.save(result.model, tmp_path / "out.onnx")
    x = np.random.default_rng(2).standard_normal((1, 4, 5, 5)).astype(np.float32)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": x}
        assert_bit_identical(ort_run(source, feeds), assert_valid(written, feeds))
