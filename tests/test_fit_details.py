"""The low-rank pass's fits end to end: post-activation refit on a conv feeding SiLU, bias
correction of whitened factors, and what each layer's fit used in the report."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from rewriter import runtime
from rewriter.calibration import CalibrationSet
from rewriter.pipeline import rewrite
from tests.builders import conv_model


def _silu_conv(seed: int = 0) -> ir.Model:
    """x -> Conv 3x3 (24 -> 16) -> y * Sigmoid(y): the conv alone feeds a SiLU."""
    proto = conv_model(["N", 24, 10, 10], 16, [3, 3], seed=seed, pads=[1, 1, 1, 1])
    proto.graph.node.extend([helper.make_node("Sigmoid", ["y"], ["s"]),
                             helper.make_node("Mul", ["y", "s"], ["out"])])
    del proto.graph.output[:]
    proto.graph.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, None))
    return ir.from_proto(proto)


def _calib(n: int = 48, seed: int = 1) -> CalibrationSet:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 24, 10, 10)).astype(np.float32) + 0.5
    return CalibrationSet({"x": x}, None, "synthetic test data")


def _post_error(result, data: np.ndarray) -> float:
    ref = runtime.run_all(result.original, {"x": data})["out"]
    got = runtime.run_all(result.model, {"x": data})["out"]
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def test_refit_after_silu_reports_its_data_and_does_not_hurt(monkeypatch):
    from rewriter import lowrank_fit

    data = _calib()
    test = _calib(32, seed=7).inputs["x"]
    opts = "bottleneck:rank=8,init=refit,sensitivity=false"
    with_act = rewrite(_silu_conv(), [opts], calib=data)
    decision = next(d for d in with_act.report.passes[0].decisions if d.applied)
    assert decision.details["activation"] == "Silu"
    assert decision.details["fit_samples"] == 36 and decision.details["fit_positions"] > 0
    before = decision.details["post_act_rel_error_before"]
    assert decision.details["post_act_rel_error_after"] <= before
    monkeypatch.setattr(lowrank_fit, "POST_ACT_ROWS", 0)
    without = rewrite(_silu_conv(), [opts], calib=data)
    assert "activation" not in next(d for d in without.report.passes[0].decisions
                                    if d.applied).details
    assert _post_error(with_act, test) <= _post_error(without, test) * 1.01


def test_whitened_factors_get_the_mean_output_shift_removed(monkeypatch):
    from rewriter import lowrank

    data = _calib()
    x = data.inputs["x"]
    opts = "bottleneck:rank=8,init=whitened,sensitivity=false"

    def plain_conv() -> ir.Model:  # no padding: the channel mean is every patch's mean
        return ir.from_proto(conv_model(["N", 24, 10, 10], 16, [3, 3], seed=3))

    def mean_shift(result) -> float:
        ref = runtime.run_all(result.original, {"x": x})["y"]
        got = runtime.run_all(result.model, {"x": x})["y"]
        return float(np.abs(got.mean(axis=(0, 2, 3)) - ref.mean(axis=(0, 2, 3))).max())

    corrected = rewrite(plain_conv(), [opts], calib=data)
    monkeypatch.setattr(lowrank, "BIAS_CORRECTION", False)
    plain = rewrite(plain_conv(), [opts], calib=data)
    assert mean_shift(plain) > 0.01  # there was a shift to remove
    assert mean_shift(corrected) < 0.25 * mean_shift(plain)
