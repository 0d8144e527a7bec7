"""The `bottleneck` pass: exactness at the weight's rank, textbook MACs, skips, shared and
Constant weights, merge, Tucker-2, float16, data-aware inits on the trained digits model, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter import load, runtime
from rewriter.calibration import CalibrationSet
from rewriter.errors import PassError
from rewriter.pipeline import rewrite
from tests.builders import conv_model, make_model
from tests.conftest import TRAINED, ort_run
from tests.passcheck import checked_proto

RANK = 8


def _low_rank(rng, o: int, c: int, kernel, rank: int) -> np.ndarray:
    """A kernel of exactly `rank` along its input channels, so rank-r factors are exact."""
    k = int(np.prod(kernel))
    w = np.einsum("ork,rc->ock", rng.standard_normal((o, rank, k)), rng.standard_normal((rank, c)))
    return (0.1 * w).reshape(o, c, *kernel).astype(np.float32)


def _with_weight(model: onnx.ModelProto, name: str, array: np.ndarray) -> onnx.ModelProto:
    for init in model.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(array, name))
    return model


def _outputs(proto: onnx.ModelProto, feeds) -> list[np.ndarray]:
    return ort_run(proto.SerializeToString(), feeds)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(a))


def _decision(result, name: str | None = None):
    decisions = result.report.passes[0].decisions
    return decisions[0] if name is None else next(d for d in decisions if d.node == name)


# ------------------------------------------------------------------------------ exactness


GEOMETRIES = {
    "stride2": ([2, 32, 12, 13], [3, 3], {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "dilation": ([2, 32, 12, 13], [3, 3], {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    "asymmetric_pads": ([2, 32, 12, 13], [3, 3], {"pads": [0, 1, 2, 1]}),
    "same_upper_stride2": ([2, 32, 12, 13], [3, 2], {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    "valid": ([2, 32, 12, 13], [5, 5], {"auto_pad": "VALID"}),
    "no_bias": ([2, 32, 12, 13], [3, 3], {"pads": [1, 1, 1, 1], "bias": False}),
    "conv1d": ([2, 32, 40], [5], {"strides": [2], "pads": [2, 1]}),
    "conv3d": ([1, 32, 6, 7, 8], [3, 3, 3], {"pads": [1, 1, 1, 1, 1, 1]}),
}


@pytest.mark.parametrize("case", sorted(GEOMETRIES))
def test_rank_of_the_weight_reproduces_outputs(case):
    shape, kernel, attrs = GEOMETRIES[case]
    attrs = dict(attrs)
    bias = attrs.pop("bias", True)
    proto = conv_model(shape, 24, kernel, bias=bias, **attrs)
    proto = _with_weight(proto, "W", _low_rank(np.random.default_rng(1), 24, 32, kernel, RANK))
    result = rewrite(load(proto), [f"bottleneck:rank={RANK}"])
    decision = _decision(result)
    assert decision.applied and decision.details["rank"] == RANK
    assert decision.macs_after < decision.macs_before
    out = checked_proto(result.model)
    assert [n.op_type for n in out.graph.node] == ["Conv", "Conv"]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    assert _rel(_outputs(proto, {"x": x})[0], _outputs(out, {"x": x})[0]) < 1e-5


def test_inception_3a_5x5_branch_textbook_macs():
    proto = conv_model([1, 256, 28, 28], 32, [5, 5], pads=[2, 2, 2, 2])
    for rounding in (1, 8):
        result = rewrite(load(proto), [f"bottleneck:rank=16,round={rounding}"])
        decision = _decision(result)
        assert (decision.macs_before, decision.macs_after) == (160_563_200, 13_246_464)
        assert result.report.macs_after < result.report.macs_before


# ------------------------------------------------------------------------------ skips


def _two_conv_model(*, shared: bool, constant: bool = False) -> onnx.ModelProto:
    """x -> conv_a(W) -> Relu -> conv_b(W or W_b); W is rank 8 along its inputs."""
    rng = np.random.default_rng(2)
    w = _low_rank(rng, 32, 32, (3, 3), RANK)
    w_b = w if shared else rng.standard_normal((32, 32, 3, 3)).astype(np.float32) * 0.1
    inits = [numpy_helper.from_array(w, "W")]
    nodes = []
    if constant:
        inits = []
        nodes.append(helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w),
                                      name="w_const"))
    if not shared:
        inits.append(numpy_helper.from_array(w_b, "W_b"))
    nodes += [
        helper.make_node("Conv", ["x", "W"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "W" if shared else "W_b"], ["y"], name="conv_b",
                         pads=[1, 1, 1, 1]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 10, 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make_model(nodes, [x], [y], inits)


def test_shared_weight_keeps_its_other_user_intact():
    proto = _two_conv_model(shared=True)
    result = rewrite(load(proto), [f"bottleneck:rank={RANK},include=conv_a"])
    assert _decision(result, "conv_b").reason == "not included"
    out = checked_proto(result.model)
    conv_b = next(n for n in out.graph.node if n.name == "conv_b")
    weights = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    original = numpy_helper.to_array(proto.graph.initializer[0])
    np.testing.assert_array_equal(weights[conv_b.input[1]], original)
    x = np.random.default_rng(3).standard_normal((1, 32, 10, 10)).astype(np.float32)
    assert _rel(_outputs(proto, {"x": x})[0], _outputs(out, {"x": x})[0]) < 1e-5


def test_constant_node_weight_is_factorized():
    proto = _two_conv_model(shared=False, constant=True)
    result = rewrite(load(proto), [f"bottleneck:rank={RANK},exclude=conv_b"])
    assert _decision(result, "conv_a").applied
    assert _decision(result, "conv_b").reason == "excluded"
    out = checked_proto(result.model)
    x = np.random.default_rng(4).standard_normal((1, 32, 10, 10)).astype(np.float32)
    assert _rel(_outputs(proto, {"x": x})[0], _outputs(out, {"x": x})[0]) < 1e-5


def _model_of(nodes, inits, in_shape, extra_inputs=()) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make_model(nodes, [x, *extra_inputs], [y], inits)


def test_a_target_on_a_model_of_only_pointwise_and_depthwise_convs_says_it_is_out_of_reach():
    """MobileNet-style models (a PicoDet layout detector: 64 pointwise, 37 depthwise convs)
    have nothing to factor: a target says so by reason instead of quietly doing nothing."""
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "Wd"], ["a"], name="dw", group=16, pads=[1] * 4),
             helper.make_node("Conv", ["a", "Wp"], ["y"], name="pw")]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in [("Wd", (16, 1, 3, 3)), ("Wp", (16, 16, 1, 1))]]
    result = rewrite(load(_model_of(nodes, inits, [1, 16, 8, 8])), ["bottleneck:target=0.3"],
                     guard=False)
    notes = result.report.passes[0].notes
    assert ("target=0.3 is out of reach: no conv this pass can factor (1 depthwise conv, "
            "1 pointwise already)") in notes
    assert result.report.macs_after == result.report.macs_before


def test_skip_reasons_and_nothing_to_do_leaves_the_model_unchanged():
    rng = np.random.default_rng(5)
    t = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    w_in = helper.make_tensor_value_info("W_rt", TensorProto.FLOAT, [16, 16, 3, 3])
    nodes = [
        helper.make_node("Conv", ["x", "Wg"], ["a"], name="grouped", group=2, pads=[1] * 4),
        helper.make_node("Conv", ["a", "Wd"], ["b"], name="depthwise", group=16, pads=[1] * 4),
        helper.make_node("Conv", ["b", "Wp"], ["c"], name="pointwise"),
        helper.make_node("Conv", ["c", "W_rt"], ["d"], name="runtime", pads=[1] * 4),
        helper.make_node("Conv", ["d", "Ws"], ["y"], name="small", pads=[1] * 4),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in
             [("Wg", t(16, 8, 3, 3)), ("Wd", t(16, 1, 3, 3)), ("Wp", t(16, 16, 1, 1)),
              ("Ws", t(1, 16, 3, 3))]]
    proto = _model_of(nodes, inits, [1, 16, 8, 8], [w_in])
    model = load(proto)
    before = ir.serde.serialize_model(model).graph.SerializeToString()
    result = rewrite(model, ["bottleneck:ratio=0.5"], guard=False)
    reasons = {d.node: d.reason for d in result.report.passes[0].decisions}
    assert reasons == {
        "grouped": "grouped conv",
        "depthwise": "depthwise conv",
        "pointwise": "pointwise already",
        "runtime": "weight computed at run time",
        "small": "rank would not save MACs",  # 1 filter: reduce + kxk costs more
    }
    report = result.report.passes[0]
    assert any(n.startswith("nothing to do") for n in report.notes)
    assert any("init=svd" in n for n in report.notes)  # says data-aware inits need data
    assert ir.serde.serialize_model(result.model).graph.SerializeToString() == before


def test_min_channels_and_min_macs():
    proto = conv_model([1, 16, 8, 8], 16, [3, 3], pads=[1] * 4, relu=True)
    result = rewrite(load(proto), ["bottleneck:min-channels=32"])
    assert _decision(result).reason.startswith("below min-channels")
    result = rewrite(load(proto), ["bottleneck:min-macs=0.999"])  # the conv is 99.3%
    assert _decision(result).reason.startswith("below min-macs")


def test_options_are_validated():
    with pytest.raises(PassError, match="one of"):
        rewrite(load(conv_model([1, 16, 8, 8], 16, [3, 3])), ["bottleneck:ratio=0.5,rank=4"])
    with pytest.raises(PassError, match="calibration"):
        rewrite(load(conv_model([1, 16, 8, 8], 16, [3, 3])), ["bottleneck:init=refit"])


# ------------------------------------------------------------------ merge, Tucker-2, fp16


def test_reduce_merges_into_a_preceding_linear_pointwise_conv():
    rng = np.random.default_rng(6)
    w1 = rng.standard_normal((32, 24, 1, 1)).astype(np.float32) * 0.2
    w2 = _low_rank(rng, 32, 32, (3, 3), RANK)
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["a"], name="pw"),
             helper.make_node("Conv", ["a", "W2"], ["y"], name="conv", pads=[1] * 4)]
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"),
             numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "B1")]
    proto = _model_of(nodes, inits, [1, 24, 9, 9])
    result = rewrite(load(proto), [f"bottleneck:rank={RANK}"])
    decision = _decision(result, "conv")
    assert decision.details["merged_into"] == "pw"
    out = checked_proto(result.model)
    assert len(out.graph.node) == 2  # no extra node: P folded into the 1x1 before
    x = rng.standard_normal((1, 24, 9, 9)).astype(np.float32)
    assert _rel(_outputs(proto, {"x": x})[0], _outputs(out, {"x": x})[0]) < 1e-5
    unmerged = rewrite(load(proto), [f"bottleneck:rank={RANK},merge=false"])
    assert len(checked_proto(unmerged.model).graph.node) == 3


def test_in_out_mode_is_tucker2_and_exact_at_the_weight_ranks():
    rng = np.random.default_rng(7)
    core = rng.standard_normal((16, 16, 3, 3))
    w = np.einsum("oa,abhw,bc->ochw", rng.standard_normal((64, 16)), core,
                  rng.standard_normal((16, 64))).astype(np.float32) * 0.05
    proto = _with_weight(conv_model([1, 64, 10, 10], 64, [3, 3], pads=[1] * 4), "W", w)
    result = rewrite(load(proto), ["bottleneck:ratio=0.25,mode=in-out"])
    decision = _decision(result)
    assert decision.details["rank"] == 16 and decision.details["rank_out"] == 16
    out = checked_proto(result.model)
    assert [n.name for n in out.graph.node] == ["conv_reduce", "conv_core", "conv_restore"]
    x = rng.standard_normal((1, 64, 10, 10)).astype(np.float32)
    assert _rel(_outputs(proto, {"x": x})[0], _outputs(out, {"x": x})[0]) < 1e-5
    # 100 positions: 64*16 reduce + 16*16*9 core + 16*64 restore per position
    assert decision.macs_after == 100 * (64 * 16 + 16 * 16 * 9 + 16 * 64)


def test_float16_model_stays_float16():
    proto = conv_model([1, 32, 8, 8], 32, [3, 3], pads=[1] * 4)
    proto = _with_weight(proto, "W", _low_rank(np.random.default_rng(8), 32, 32, (3, 3), RANK))
    from onnx import version_converter  # noqa: F401  (float16 via a cast of the tensors)

    for init in proto.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16),
                                              init.name))
    proto.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    proto.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    proto = onnx.shape_inference.infer_shapes(proto)
    result = rewrite(load(proto), [f"bottleneck:rank={RANK}"])
    out = checked_proto(result.model)
    assert {i.data_type for i in out.graph.initializer} == {TensorProto.FLOAT16}
    x = np.random.default_rng(9).standard_normal((1, 32, 8, 8)).astype(np.float16)
    assert _rel(_outputs(proto, {"x": x})[0], _outputs(out, {"x": x})[0]) < 1e-2


# ------------------------------------------------------------------------------ data-aware


def _relu_stack(seed: int = 10) -> onnx.ModelProto:
    """conv3x3 -> relu -> conv3x3 -> relu -> conv3x3, random weights, for pipeline checks."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i in range(3):
        inits.append(numpy_helper.from_array(
            (rng.standard_normal((32, 32, 3, 3)) / np.sqrt(32 * 9)).astype(np.float32), f"W{i}"))
        out = "y" if i == 2 else f"c{i}"
        nodes.append(helper.make_node("Conv", [prev, f"W{i}"], [out], name=f"conv{i}",
                                      pads=[1] * 4))
        if i < 2:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            prev = f"r{i}"
    return _model_of(nodes, inits, ["N", 32, 12, 12])


def _calib(n: int = 48, seed: int = 11) -> CalibrationSet:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 4, 12, 12))
    mix = rng.standard_normal((32, 4))  # low-dimensional, correlated channels: data matters
    x = np.einsum("ck,nkhw->nchw", mix, base) + 0.1 * rng.standard_normal((n, 32, 12, 12))
    return CalibrationSet({"x": x.astype(np.float32)}, source="test")


def test_report_has_estimates_measurements_and_sensitivity_with_calibration():
    result = rewrite(load(_relu_stack()), ["bottleneck:ratio=0.25"], calib=_calib())
    report = result.report.passes[0]
    assert report.metrics["init"] == "refit" and report.metrics["layers_rewritten"] == 3
    for decision in report.decisions:
        for key in ("rank", "estimated_rel_error", "measured_rel_error", "sensitivity_task_error"):
            assert key in decision.details, key
    assert report.metrics["model_macs_removed_share"] > 0.4
    assert result.report.fidelity["cosine"] > 0.8  # random deep layers are not low rank
    checked_proto(result.model)


def test_target_and_energy_select_ranks():
    model = load(_relu_stack())
    result = rewrite(model, ["bottleneck:target=0.5,round=4"])
    metrics = result.report.passes[0].metrics
    assert metrics["model_macs_removed_share"] >= 0.5
    full = rewrite(load(_relu_stack()), ["bottleneck:energy=1.0,round=1"])
    assert all(not d.applied for d in full.report.passes[0].decisions)  # nothing to cut
    some = rewrite(load(_relu_stack()), ["bottleneck:energy=0.5,round=1"])
    assert all(d.details["kept_energy"] >= 0.5 for d in some.report.passes[0].decisions)


def test_target_auto_keeps_the_cosine_floor():
    calib = _calib(96)  # >= 16 samples in the select split, the rest fit and report
    spec = "bottleneck:target=auto,min-cosine=0.995,round=4,auto-steps=4"
    result = rewrite(load(_relu_stack()), [spec], calib=calib)
    report = result.report.passes[0]
    assert result.report.fidelity["cosine"] >= 0.995
    assert report.metrics["auto_target"] > 0.1


# ------------------------------------------------------------------------------ trained digits

DIGITS = TRAINED / "digits_cnn.onnx"
needs_digits = pytest.mark.skipif(not DIGITS.exists(), reason="models/trained not built yet")


def _digits_error(init: str, ratio: float, n_calib: int) -> float:
    calib = dict(np.load(TRAINED / "digits_calib.npz"))
    test = dict(np.load(TRAINED / "digits_test.npz"))
    data = CalibrationSet({"input": calib["input"][:n_calib]}, calib["labels"][:n_calib],
                          "digits_calib")
    result = rewrite(load(DIGITS), [f"bottleneck:ratio={ratio},init={init},sensitivity=false"],
                     calib=data, holdout=0.1)
    ref = runtime.run_all(result.original, {"input": test["input"]})["logits"]
    got = runtime.run_all(result.model, {"input": test["input"]})["logits"]
    return _rel(ref, got)


@needs_digits
@pytest.mark.parametrize("ratio", [
    pytest.param(0.125, marks=pytest.mark.slow), 0.25, pytest.param(0.5, marks=pytest.mark.slow)])
def test_digits_refit_beats_whitened_beats_svd(ratio):
    n_calib = 96 if ratio == 0.25 else 256  # the fast case fits on fewer samples
    errors = {init: _digits_error(init, ratio, n_calib) for init in ("svd", "whitened", "refit")}
    assert errors["refit"] <= errors["whitened"] <= errors["svd"], errors


# ------------------------------------------------------------------------------ CLI


def test_cli_writes_a_rewritten_model(tmp_path: Path):
    model_path = tmp_path / "m.onnx"
    onnx.save(_relu_stack(), str(model_path))
    calib_path = tmp_path / "calib.npz"
    np.savez(calib_path, x=_calib(24).inputs["x"])
    out = tmp_path / "out.onnx"
    exe = Path(sys.executable).with_name("rewrite")
    done = subprocess.run(
        [str(exe), str(model_path), "--pass", "bottleneck:ratio=0.25", "--calib", str(calib_path),
         "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    assert len(written.graph.node) == 8  # 3 reduce + 3 kxk + 2 relu
    x = _calib(2).inputs["x"]
    assert _outputs(written, {"x": x})[0].shape == (2, 32, 12, 12)


# ------------------------------------------------------------------------------ objective=latency


def _stride_pair_model() -> onnx.ModelProto:
    """x -> conv_a (3x3, stride 1) -> Relu -> conv_b (3x3, stride 2): two differently shaped
    layers, so a stub timer can tell them apart."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array((0.1 * rng.standard_normal((32, 32, 3, 3))).astype(
        np.float32), name) for name in ("W_a", "W_b")]
    nodes = [
        helper.make_node("Conv", ["x", "W_a"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "W_b"], ["y"], name="conv_b", pads=[1, 1, 1, 1],
                         strides=[2, 2]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 10, 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make_model(nodes, [x], [y], inits)


@pytest.fixture
def stub_timer(monkeypatch):
    """Deterministic timings: the stride-1 layer costs 4 ms and its factorization
    4·(r/32 + 0.1) ms; the stride-2 layer's factorization is always 10% slower. Records calls."""
    from rewriter import conv_timing

    calls = []

    def fake(layer, rank, rank_out=None, threads=1, min_time_s=0.0):
        calls.append((layer.geometry.strides, rank, rank_out, threads))
        if layer.geometry.strides == (2, 2):
            return conv_timing.LayerTiming(1.0, 1.1, 1.0 / 1.1)
        after = 4.0 * (rank / layer.in_shape[1] + 0.1)
        return conv_timing.LayerTiming(4.0, after, 4.0 / after)

    monkeypatch.setattr(conv_timing, "time_factorization", fake)
    monkeypatch.setattr(conv_timing, "model_time_ms", lambda *a, **k: 10.0)
    return calls


def test_latency_objective_skips_the_layer_measured_slower(stub_timer):
    result = rewrite(load(_stride_pair_model()),
                     ["bottleneck:ratio=0.5,objective=latency,threads=2"])
    applied, skipped = _decision(result, "conv_a"), _decision(result, "conv_b")
    assert applied.applied and not skipped.applied
    assert skipped.reason.startswith("not faster in onnxruntime (measured 0.91x")
    assert skipped.details["layer_ms_after"] == 1.1
    assert applied.details["layer_ms_before"] == 4.0
    assert applied.details["layer_ms_after"] == pytest.approx(4.0 * 0.6, abs=1e-3)
    metrics = result.report.passes[0].metrics
    assert metrics["objective"] == "latency" and metrics["layers_timed"] == 2
    assert {c[3] for c in stub_timer} == {2}  # the threads option reaches the timer
    assert len(stub_timer) == 2  # each layer timed once: the report reuses the cached numbers
    checked_proto(result.model)


def test_latency_min_gain_follows_the_measured_share(stub_timer):
    # conv_a at rank 16 saves 40% of its time: kept at min-gain 0.35, skipped at 0.45
    kept = rewrite(load(_stride_pair_model()), ["bottleneck:ratio=0.5,objective=latency,"
                                                "min-gain=0.35"])
    dropped = rewrite(load(_stride_pair_model()), ["bottleneck:ratio=0.5,objective=latency,"
                                                   "min-gain=0.45"])
    assert _decision(kept, "conv_a").applied
    assert not _decision(dropped, "conv_a").applied
    assert "nothing to do" in " ".join(dropped.report.passes[0].notes)


def test_latency_target_allocates_measured_milliseconds(stub_timer):
    # model "takes" 10 ms; target 0.1 = 1 ms to save: conv_a alone can, conv_b never saves time
    result = rewrite(load(_stride_pair_model()),
                     ["bottleneck:target=0.1,objective=latency,latency-ranks=3"])
    conv_a, conv_b = _decision(result, "conv_a"), _decision(result, "conv_b")
    assert conv_a.applied and conv_b.reason.startswith("not faster in onnxruntime")
    saved = conv_a.details["layer_ms_before"] - conv_a.details["layer_ms_after"]
    assert saved >= 1.0
    # timed grid 24/16/8 saves 0.6/1.6/2.6 ms: rank 16 is the largest that meets the 1 ms
    assert conv_a.details["rank"] == 16
    assert len({c[1] for c in stub_timer if c[0] == (1, 1)}) == 3  # a 3-rank grid was timed
    assert result.report.passes[0].metrics["model_time_removed_share_est"] >= 0.1


def test_latency_objective_option_is_validated():
    with pytest.raises(Exception, match="objective"):
        rewrite(load(_stride_pair_model()), ["bottleneck:objective=seconds"])
    with pytest.raises(Exception, match="min-gain"):
        rewrite(load(_stride_pair_model()), ["bottleneck:objective=latency,min-gain=1.5"])


def test_latency_objective_real_timing_has_the_report_structure():
    """A real onnxruntime timing of a tiny layer (where the 1x1's overhead may well dominate):
    whichever way it goes, the decision carries the measured numbers."""
    proto = conv_model([1, 16, 6, 6], 16, [3, 3], pads=[1, 1, 1, 1])
    result = rewrite(load(proto), ["bottleneck:ratio=0.5,objective=latency"])
    decision = _decision(result)
    assert {"layer_ms_before", "layer_ms_after"} <= set(decision.details)
    if decision.applied:
        assert decision.details["layer_speedup"] >= 1 / 0.95
    else:
        assert decision.reason.startswith("not faster in onnxruntime (measured")
        assert decision.details["layer_speedup"] < 1 / 0.95
    out = checked_proto(result.model)
    x = np.random.default_rng(0).standard_normal((1, 16, 6, 6)).astype(np.float32)
    assert _outputs(out, {"x": x})[0].shape == (1, 16, 6, 6)


# ------------------------------------------------------------------------------ method=auto


def test_method_auto_needs_a_global_budget():
    with pytest.raises(PassError, match="method=auto"):
        rewrite(load(_relu_stack()), ["bottleneck:method=auto,ratio=0.5"])


def test_method_auto_allocates_on_measured_errors_over_every_method():
    result = rewrite(load(_relu_stack()), ["bottleneck:method=auto,target=0.4,init=whitened,"
                                           "measure-ranks=2"], calib=_calib(32))
    report = result.report.passes[0]
    assert report.metrics["allocation"] == "measured" and report.metrics["mode"] == "auto"
    applied = [d for d in report.decisions if d.applied]
    assert applied
    for decision in applied:
        grid = decision.details["task_error_grid"]
        assert {k.split()[0] for k in grid} >= {"rank", "spatial"}  # both kinds were measured
        assert decision.details["task_error"] in grid.values()
    assert "whole_model_error" in report.metrics
    removed = report.metrics["model_macs_removed_share"]
    assert removed >= 0.4 or report.metrics.get("backed_off")
    checked_proto(result.model)


def test_method_defaults_to_auto_with_a_target_and_data_unless_a_mode_is_named():
    def mode_of(spec: str, calib) -> str:
        report = rewrite(load(_relu_stack()), [spec], calib=calib).report.passes[0]
        return report.metrics["mode"]

    data = _calib(32)
    assert mode_of("bottleneck:target=0.4,init=whitened,measure-ranks=2", data) == "auto"
    assert mode_of("bottleneck:target=0.4,init=whitened,mode=in", data) == "in"
    assert mode_of("bottleneck:target=0.4,init=whitened,method=mode", data) == "in"
    assert mode_of("bottleneck:target=0.4", None) == "in"  # no data: nothing to measure on
    assert mode_of("bottleneck:ratio=0.5,init=whitened", data) == "in"  # no global budget


def _pointwise_stack(seed: int = 13) -> onnx.ModelProto:
    """conv3x3 -> relu -> a wide 1x1 (64 -> 64) -> relu -> 1x1 SE-sized head on 1x1 maps."""
    rng = np.random.default_rng(seed)
    t = lambda *s: (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "W0"], ["a"], name="conv3x3", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "W1", "B1"], ["c"], name="wide1x1"),
             helper.make_node("Relu", ["c"], ["d"]),
             helper.make_node("GlobalAveragePool", ["d"], ["g"]),
             helper.make_node("Conv", ["g", "W2"], ["y"], name="se1x1")]
    inits = [numpy_helper.from_array(a, n) for n, a in
             [("W0", t(64, 32, 3, 3)), ("W1", t(64, 64, 1, 1)),
              ("B1", rng.standard_normal(64).astype(np.float32)), ("W2", t(64, 64, 1, 1))]]
    return _model_of(nodes, inits, ["N", 32, 12, 12])


def test_measured_allocation_factors_large_1x1_convs_and_leaves_tiny_ones():
    """With a target allocated on measurements, a 1x1 is a candidate: C -> r -> O as two 1x1
    convs, both fitted at once; an SE-sized 1x1 is left alone with its reason, and
    pointwise=false restores the old refusal."""
    spec = "bottleneck:target=0.05,method=auto,measure-ranks=2,include=wide*+se*"
    result = rewrite(load(_pointwise_stack()), [spec], calib=_calib(32))
    wide = _decision(result, "wide1x1")
    assert wide.applied and wide.details["rank"] < 32  # saves only below C·O/(C+O) = 32
    assert "below 0.5%" in _decision(result, "se1x1").reason
    proto = checked_proto(result.model)
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert [n.name for n in convs] == ["conv3x3", "wide1x1_reduce", "wide1x1_expand", "se1x1"]
    assert wide.macs_after == wide.details["rank"] * (64 + 64) * 12 * 12
    feeds = {"x": _calib(8, seed=3).inputs["x"]}
    before = _outputs(_pointwise_stack(), feeds)[0]
    after = _outputs(proto, feeds)[0]
    assert np.all(np.isfinite(after)) and _rel(before, after) < 0.3  # rank 8 of 64: 0.14
    off = rewrite(load(_pointwise_stack()), [spec + ",pointwise=false"], calib=_calib(32))
    assert _decision(off, "wide1x1").reason == "pointwise already"
    rule = rewrite(load(_pointwise_stack()), ["bottleneck:ratio=0.5,init=whitened"],
                   calib=_calib(32))
    assert _decision(rule, "wide1x1").reason == "pointwise already"  # no blind rank rule


def test_refit_runs_the_rewritten_model_forward_once_where_its_inputs_fit(monkeypatch):
    """Where the inputs fit, each group's run starts from what the last one held and serves
    the reduce alternation too: the same factors from 2 runs of the rewritten model (the
    first group reads the graph input) instead of 3 per group streamed from the inputs."""
    import rewriter.lowrank_fit as fit

    runs = []
    real = fit.runtime.run_batched

    def counted(*args, **kwargs):
        if "calibration (fit)" in args:
            runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fit.runtime, "run_batched", counted)
    spec = ["bottleneck:ratio=0.5,init=refit,refit-reduce=1"]
    held = checked_proto(rewrite(load(_relu_stack()), spec, calib=_calib(32), guard=False).model)
    held_runs = len(runs)
    runs.clear()
    monkeypatch.setattr(fit, "FEED_BYTES", 0)
    rerun = checked_proto(rewrite(load(_relu_stack()), spec, calib=_calib(32), guard=False).model)
    assert len(runs) - held_runs == 3 * 3 - 2  # 3 refit groups (each conv feeds the next)
    weights = lambda proto: [numpy_helper.to_array(i) for i in proto.graph.initializer]  # noqa: E731
    for a, b in zip(weights(held), weights(rerun), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_target_that_costs_the_task_far_more_than_auto_allows_says_so():
    """A fixed target is kept as asked, but the report names what it costs (PicoDet's layout
    model at target=0.3: task error 0.25, 25x target=auto's floor); a cheap one stays quiet."""
    def notes(spec: str) -> list[str]:
        return rewrite(load(_relu_stack()), [spec], calib=_calib(32)).report.passes[0].notes

    costly = [n for n in notes("bottleneck:target=0.9,measure-ranks=2") if "costs the task" in n]
    assert len(costly) == 1 and "target=0.9" in costly[0] and "target=auto" in costly[0]
    assert not any("costs the task" in n for n in notes("bottleneck:target=0.9,measure-ranks=2,"
                                                         "max-error=10"))


def test_max_layer_error_caps_every_layer_and_says_the_target_is_out_of_reach():
    result = rewrite(load(_relu_stack()), ["bottleneck:target=0.6,allocate=measured,"
                                           "max-layer-error=1e-6,init=whitened"],
                     calib=_calib(32))
    report = result.report.passes[0]
    assert not any(d.applied for d in report.decisions)
    assert all(d.reason.startswith("every rank above max-layer-error") for d in report.decisions)
    assert any("not reachable" in n for n in report.notes)


@needs_digits
@pytest.mark.slow
def test_digits_method_auto_keeps_the_predictions():
    calib = dict(np.load(TRAINED / "digits_calib.npz"))
    data = CalibrationSet({"input": calib["input"][:96]}, calib["labels"][:96], "digits")
    result = rewrite(load(DIGITS), ["fold-bn", "bottleneck:method=auto,target=0.5,"
                                               "measure-ranks=2,init=whitened"], calib=data)
    metrics = result.report.passes[-1].metrics
    # The target is met unless the whole model measured worse than the per-layer errors
    # predicted and ranks were backed off (then the report says so).
    assert metrics["model_macs_removed_share"] >= 0.4 or metrics.get("backed_off")
    assert metrics["model_macs_removed_share"] >= 0.2
    assert result.report.fidelity["cosine"] > 0.99
    methods = {d.details.get("method", "in") for d in result.report.passes[-1].decisions
               if d.applied}
    assert methods  # the plan records which factorization each layer got


@needs_digits
@pytest.mark.slow
def test_refit_is_judged_as_emitted_before_ranks_back_off():
    """On the digits CNN the start (whitened) factors of an 80% plan measure several times worse
    than the per-layer sum predicts, but refit recovers nearly all of it: the whole plan is then
    judged refit, nothing backs off, and the target and the test accuracy both hold."""
    calib = dict(np.load(TRAINED / "digits_calib.npz"))
    test = dict(np.load(TRAINED / "digits_test.npz"))
    data = CalibrationSet({"input": calib["input"]}, calib["labels"], "digits")
    result = rewrite(load(DIGITS), ["fold-bn", "bottleneck:target=0.8,init=refit"], calib=data)
    metrics = result.report.passes[-1].metrics
    assert not metrics.get("backed_off")
    assert metrics["whole_model_error"] < metrics["predicted_error"]
    assert 1 - result.report.macs_after / result.report.macs_before >= 0.78
    logits = runtime.run_all(result.model, {"input": test["input"]})["logits"]
    assert float((logits.argmax(1) == test["labels"]).mean()) >= 0.99  # 540 labelled images


DETECTOR = TRAINED / "detector.onnx"


@pytest.mark.slow
def test_detector_measured_allocation_keeps_detections():
    """Allocation on measured task errors, on the trained detector, judged by detections."""
    from rewriter.detection import decode, detection_f1

    calib = dict(np.load(TRAINED / "detector_calib.npz"))
    test = dict(np.load(TRAINED / "detector_test.npz"))
    data = CalibrationSet({"images": calib["images"][:48]}, source="detector_calib")
    result = rewrite(load(DETECTOR), ["bottleneck:target=0.2,allocate=measured,measure-ranks=2,"
                                      "init=whitened,mode=in"], calib=data)
    report = result.report.passes[0]
    assert report.metrics["allocation"] == "measured"
    assert all("task_error_grid" in d.details for d in report.decisions if d.applied)
    feeds = {"images": test["images"][:16]}
    ref = decode(runtime.run_all(result.original, feeds)["output0"])
    got = decode(runtime.run_all(result.model, feeds)["output0"])
    assert detection_f1(ref, got) >= 0.8


def test_default_pass_leaves_alone_what_costs_the_task_out_of_proportion():
    """White-noise inputs leave a random kernel no low-rank slack: each halved layer costs far
    more task error than its share of the MACs is worth, so the default pass skips it and says
    why; a rank-4 input makes the first layer's rewrite nearly free, and it is applied. A named
    ratio is the user's call and is applied either way."""
    rng = np.random.default_rng(3)
    white = CalibrationSet({"x": rng.standard_normal((48, 32, 12, 12)).astype(np.float32)},
                           source="test")
    skipped = rewrite(load(_relu_stack()), ["bottleneck"], calib=white).report.passes[0]
    reasons = [d.reason for d in skipped.decisions if not d.applied]
    assert skipped.n_applied == 0 and len(reasons) == 3
    assert all(r.startswith("does not pay: task error") for r in reasons), reasons
    base = rng.standard_normal((48, 4, 12, 12))
    low_rank = np.einsum("ck,nkhw->nchw", rng.standard_normal((32, 4)), base)
    correlated = CalibrationSet({"x": low_rank.astype(np.float32)}, source="test")
    applied = rewrite(load(_relu_stack()), ["bottleneck"], calib=correlated).report.passes[0]
    first = next(d for d in applied.decisions if d.node == "conv0")
    assert first.applied  # sees the rank-4 input itself; the ReLU'd layers after it need not
    assert all(d.reason.startswith("does not pay") for d in applied.decisions if not d.applied)
    asked = rewrite(load(_relu_stack()), ["bottleneck:ratio=0.5"], calib=white).report.passes[0]
    assert asked.n_applied == 3


def test_a_sensitivity_sweep_over_its_mac_budget_measures_on_fewer_samples(monkeypatch):
    """Past `SWEEP_MACS` the trials run on a spread subset of the held-out split (at least
    min-samples), and the report says how many; measure-samples names the count."""
    import rewriter.lowrank_sensitivity as sensitivity

    spec = "bottleneck:target=0.3,method=auto,measure-ranks=2,min-samples=8"
    full = rewrite(load(_relu_stack()), [spec], calib=_calib(64)).report.passes[0]
    held_out = full.metrics["sensitivity_samples"]  # all of them: the sweep fits
    assert held_out > 8
    monkeypatch.setattr(sensitivity, "SWEEP_MACS", 1.0)
    sensitivity.clear_cache()
    part = rewrite(load(_relu_stack()), [spec], calib=_calib(64)).report.passes[0]
    assert part.metrics["sensitivity_samples"] == 8
    assert any(f"measured on 8 of the {held_out} held-out samples" in n for n in part.notes)
    asked = rewrite(load(_relu_stack()), [spec + ",measure-samples=10"],
                    calib=_calib(64)).report.passes[0]
    assert asked.metrics["sensitivity_samples"] == 10
