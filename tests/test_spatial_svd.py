"""`spatial-svd`: exact at the kernel's spatial rank for every geometry, textbook MACs, skips,
data-aware inits on the trained digits model, target and target=auto from the shared parts."""

from __future__ import annotations

import numpy as np
import pytest

from rewriter import load, runtime
from rewriter.calibration import CalibrationSet
from rewriter.graph import Namer
from rewriter.lowrank_emit import emit
from rewriter.lowrank_methods import METHODS, Rank
from rewriter.lowrank_select import select_convs
from rewriter.pipeline import rewrite
from rewriter.spatial_lowrank import spatial_factors, spatial_reconstruct, spatial_spectrum
from tests.builders import conv_model, spatial_low_rank_kernel, with_initializer
from tests.conftest import TRAINED, ort_run
from tests.passcheck import checked_proto

SHAPE = [2, 16, 11, 13]
GEOMETRIES = {
    "pads": {"pads": [1, 1, 1, 1]},
    "stride_asymmetric_pads": {"strides": [2, 2], "pads": [1, 0, 2, 1]},
    "stride_per_axis": {"strides": [1, 2], "pads": [2, 1, 2, 1], "kernel": [5, 3]},
    "dilation": {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
    "same_upper_stride2": {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    "same_lower": {"auto_pad": "SAME_LOWER"},
    "valid_no_bias": {"auto_pad": "VALID", "bias": False},
}


def _case(name: str):
    attrs = dict(GEOMETRIES[name])
    kernel = attrs.pop("kernel", [3, 3])
    bias = attrs.pop("bias", True)
    return conv_model(SHAPE, 24, kernel, bias=bias, **attrs), kernel


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(a))


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


@pytest.mark.parametrize("case", sorted(GEOMETRIES))
def test_full_rank_pair_reproduces_outputs(case):
    """The emitted kx1 + 1xk pair at full rank is the original conv (geometry split right)."""
    proto, _ = _case(case)
    model = load(proto)
    (layer,) = select_convs(model).layers
    method = METHODS["spatial"]
    rank = Rank(method.full_rank(layer), None, "spatial")
    factors = method.factors(layer, method.spectrum(layer, None, 0.0), rank)
    np.testing.assert_allclose(spatial_reconstruct(factors), layer.weight, atol=1e-9)
    emit(model, layer.node, layer, factors, Namer(model))
    out = checked_proto(model)
    assert [n.op_type for n in out.graph.node] == ["Conv", "Conv"]
    assert _rel(ort_run(proto.SerializeToString(), {"x": _x()})[0],
                ort_run(out.SerializeToString(), {"x": _x()})[0]) < 1e-5


@pytest.mark.parametrize("case", ["pads", "same_upper_stride2", "stride_per_axis"])
def test_pass_at_the_kernels_spatial_rank_is_exact_and_cheaper(case):
    proto, kernel = _case(case)
    w = spatial_low_rank_kernel(np.random.default_rng(1), 24, 16, kernel, 8)
    proto = with_initializer(proto, "W", w)
    result = rewrite(load(proto), ["spatial-svd:rank=8"])
    decision = result.report.passes[0].decisions[0]
    assert decision.applied and decision.details["method"] == "spatial"
    assert decision.macs_after < decision.macs_before
    out = checked_proto(result.model)
    assert _rel(ort_run(proto.SerializeToString(), {"x": _x()})[0],
                ort_run(out.SerializeToString(), {"x": _x()})[0]) < 1e-5


def test_macs_are_the_vertical_plus_horizontal_conv():
    proto = conv_model([1, 16, 10, 10], 32, [3, 3], pads=[1, 1, 1, 1])
    result = rewrite(load(proto), ["spatial-svd:rank=8"])
    decision = result.report.passes[0].decisions[0]
    # kx1: 10x10 positions, 8 filters over 16x3; 1xk: 10x10 positions, 32 filters over 8x3
    assert decision.macs_after == 100 * 8 * 16 * 3 + 100 * 32 * 8 * 3
    assert decision.params_after == 8 * 16 * 3 + 32 * 8 * 3 + 32


def test_kernels_that_are_already_separable_are_skipped_with_a_reason():
    result = rewrite(load(conv_model([1, 16, 10, 10], 16, [3, 1], pads=[1, 0, 1, 0])),
                     ["spatial-svd:ratio=0.5"])
    decision = result.report.passes[0].decisions[0]
    assert decision.reason.startswith("not a 2-D kxk kernel")
    assert any(n.startswith("nothing to do") for n in result.report.passes[0].notes)


def test_whitened_spectrum_is_the_plain_one_under_white_inputs():
    w = np.random.default_rng(2).standard_normal((8, 4, 3, 3))
    plain = spatial_spectrum(w)
    white = spatial_spectrum(w, np.eye(12), alpha=0.0)
    np.testing.assert_allclose(plain.s, white.s, rtol=1e-6)
    f = spatial_factors(white, 12, w.shape, None)
    np.testing.assert_allclose(spatial_reconstruct(f), w, atol=1e-8)


# ------------------------------------------------------------------------------ trained digits

DIGITS = TRAINED / "digits_cnn.onnx"
needs_digits = pytest.mark.skipif(not DIGITS.exists(), reason="models/trained not built yet")


def _digits(n: int) -> tuple[CalibrationSet, dict]:
    calib = dict(np.load(TRAINED / "digits_calib.npz"))
    test = dict(np.load(TRAINED / "digits_test.npz"))
    return (CalibrationSet({"input": calib["input"][:n]}, calib["labels"][:n], "digits_calib"),
            {"input": test["input"]})


@needs_digits
@pytest.mark.slow
def test_digits_refit_beats_svd_at_the_same_cut():
    data, test = _digits(96)
    errors, removed = {}, {}
    for init in ("svd", "refit"):
        result = rewrite(load(DIGITS), [f"spatial-svd:target=0.4,init={init},sensitivity=false"],
                         calib=data, holdout=0.1)
        ref = runtime.run_all(result.original, test)["logits"]
        errors[init] = _rel(ref, runtime.run_all(result.model, test)["logits"])
        removed[init] = result.report.passes[0].metrics["model_macs_removed_share"]
        checked_proto(result.model)
    assert min(removed.values()) >= 0.4
    assert errors["refit"] < errors["svd"], errors


@needs_digits
@pytest.mark.slow
def test_digits_target_auto_keeps_the_cosine_floor():
    data, _ = _digits(96)
    result = rewrite(load(DIGITS), ["spatial-svd:target=auto,min-cosine=0.995,auto-steps=3"],
                     calib=data, holdout=0.25)
    assert result.report.fidelity["cosine"] >= 0.995
    assert result.report.passes[0].metrics["auto_target"] > 0.2
