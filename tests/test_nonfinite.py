"""Nothing non-finite ships: bad calibration values are refused before fitting, NaN fails every
comparison, NaN weights or outputs fail the step that made them, and `save` refuses them.

The review wrote all-NaN weights with exit 0 (`ridge=nan`, calibration values of 3e38) because
`rel_l2 > bound` is false for NaN. The passes here are registered by this module only.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from rewriter.passes import RewritePass, register

import rewriter
from rewriter.errors import CalibrationError, InternalCheckError, ModelSaveError
from rewriter.finite import MAX_ABS, bad_samples, within
from rewriter.graph import Namer, const_array, nodes_by_op, set_constant_input
from tests.builders import conv_model
from tests.harden_helpers import calib_npz, run_main
from tests.test_bad_input import assert_one_line_error


class _NaNWeights(RewritePass):
    """Put NaN into the first Conv weight; subclasses pick what bound they declare."""

    def apply(self, model: ir.Model) -> None:
        node = nodes_by_op(model, ["Conv"])[0]
        weight = const_array(node.inputs[1]).copy()
        weight[0] = np.nan
        set_constant_input(model.graph, node, 1, weight, Namer(model), f"{node.name}_W")
        self.report.applied(node.name, node.op_type, "NaN weight")


@register
class NaNWeightsBounded(_NaNWeights):
    name = "test-nan-bounded"
    summary = "(tests only) NaN weights under a declared bound of 1.0"

    def apply(self, model: ir.Model) -> None:
        super().apply(model)
        self.report.error_bound = 1.0


@register
class NaNWeightsUnbounded(_NaNWeights):
    name = "test-nan-unbounded"
    summary = "(tests only) NaN weights, no declared bound"


@register
class NaNOutputs(RewritePass):
    """Finite weights, NaN outputs: the final Relu becomes Sqrt of a value that is negative."""

    name = "test-nan-outputs"
    summary = "(tests only) Relu -> Sqrt(-|x| - 1): NaN outputs from finite weights"

    def apply(self, model: ir.Model) -> None:
        node = nodes_by_op(model, ["Relu"])[0]
        node.op_type = "Sqrt"
        self.report.applied(node.name, node.op_type, "sqrt of negatives")


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(["n", 4, 8, 8], 8, [3, 3], pads=[1, 1, 1, 1], relu=True), path)
    return path


def test_nan_fails_every_bound():
    assert within(0.5, 1.0) and not within(float("nan"), 1.0) and not within(None, 1.0)
    assert not within(float("inf"), 1e300)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 3e38, 2 * MAX_ABS])
def test_bad_calibration_values_refused_before_fitting(tmp_path, capfd, model_path, value):
    x = np.random.default_rng(0).standard_normal((8, 4, 8, 8)).astype(np.float32)
    x[[2, 5], 0, 0, 0] = value
    calib = calib_npz(tmp_path, x=x)
    out = tmp_path / "o.onnx"
    result = run_main(capfd, model_path, "--pass", "fold-bn", "--calib", calib, "-o", out)
    assert_one_line_error(result, "input 'x'", "2 of 8 samples", "sample 2")
    assert not out.exists()


def test_float64_values_overflowing_float32_refused(model_path):
    x = np.ones((4, 4, 8, 8), np.float64)
    x[1] = 1e39  # becomes inf in float32
    with pytest.raises(CalibrationError, match="1 of 4 samples"):
        rewriter.rewrite(rewriter.load(model_path), ["cleanup"], calib={"x": x})


def test_bad_samples_counts_per_sample():
    x = np.zeros((5, 3), np.float32)
    x[1, 2], x[3, 0], x[3, 1] = np.nan, np.inf, -np.inf
    assert bad_samples(x).tolist() == [1, 3]
    assert bad_samples(np.zeros((2, 2), np.int64)).tolist() == []


@pytest.mark.parametrize("name", ["test-nan-bounded", "test-nan-unbounded", "test-nan-outputs"])
def test_nonfinite_pass_output_discarded(model_path, name):
    result = rewriter.rewrite(rewriter.load(model_path), [name])
    assert len(result.discarded) == 1 and "NaN/inf" in result.discarded[0]
    assert result.report.passes[0].metrics["discarded"] is True


@pytest.mark.parametrize("name", ["test-nan-bounded", "test-nan-outputs"])
def test_nonfinite_pass_discarded_with_calibration(model_path, tmp_path, name):
    result = rewriter.rewrite(rewriter.load(model_path), [name],
                              calib=str(calib_npz(tmp_path)))
    assert len(result.discarded) == 1


def test_cli_writes_no_nonfinite_model(model_path, tmp_path):
    out = tmp_path / "o.onnx"
    result = run_main_subprocess(model_path, "--pass", "test-nan-bounded", "-o", out)
    assert_one_line_error(result, "NaN/inf", "nothing written")
    assert not out.exists()


def run_main_subprocess(*args):
    import subprocess
    import sys

    from tests.conftest import ROOT

    return subprocess.run([sys.executable, "-m", "tests.harden_cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_save_refuses_nonfinite_new_tensor(model_path, tmp_path):
    model = rewriter.load(model_path)
    node = nodes_by_op(model, ["Conv"])[0]
    weight = const_array(node.inputs[1]).copy()
    weight[0, 0, 0, 0] = np.inf
    set_constant_input(model.graph, node, 1, weight, Namer(model), "nonfinite_W")
    with pytest.raises(ModelSaveError, match="initializer 'nonfinite_W' with 1 NaN/inf"):
        rewriter.save(model, tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()


def test_input_model_masks_may_keep_inf(tmp_path):
    """-inf read from the input file (attention masks do this) is the user's, saved as is."""
    proto = conv_model([1, 4, 8, 8], 8, [3, 3])
    proto.graph.initializer[1].float_data[:] = []
    bias = np.zeros(8, np.float32)
    bias[0] = -np.inf
    proto.graph.initializer[1].CopyFrom(onnx.numpy_helper.from_array(bias, "B"))
    out = rewriter.save(rewriter.load(proto), tmp_path / "o.onnx")
    assert np.isneginf(onnx.numpy_helper.to_array(onnx.load(str(out)).graph.initializer[1])[0])


def test_refit_with_nan_ridge_fails_closed(tmp_path, capfd):
    """bottleneck refit with ridge=nan: refused as an option (exit 2) before any work, so no
    NaN factor is ever fitted; no model."""
    path = tmp_path / "b.onnx"
    onnx.save(conv_model(["n", 16, 8, 8], 16, [3, 3], pads=[1] * 4, relu=True), path)
    x = np.random.default_rng(0).standard_normal((32, 16, 8, 8)).astype(np.float32)
    out = tmp_path / "o.onnx"
    result = run_main(capfd, path, "--pass", "bottleneck:ridge=nan,init=refit", "--calib",
                      calib_npz(tmp_path, x=x), "-o", out)
    assert result.returncode == 2 and "ridge=nan" in result.stderr, result.stderr
    assert not out.exists()


def test_ridge_choice_with_all_nan_errors_is_an_error():
    from rewriter.ridge import choose_lambda

    x = np.full((8, 3), np.nan)
    with pytest.raises(CalibrationError, match="NaN/inf"):
        choose_lambda(x, x, x, x)


def test_fidelity_with_nan_candidate_raises(model_path):
    from rewriter.calibration import CalibrationSet
    from rewriter.pipeline import measure_fidelity

    original = rewriter.load(model_path)
    broken = rewriter.load(model_path)
    nodes_by_op(broken, ["Relu"])[0].op_type = "Sqrt"
    x = -np.abs(np.random.default_rng(0).standard_normal((4, 4, 8, 8))).astype(np.float32) - 1
    with pytest.raises(InternalCheckError, match="NaN/inf"):
        measure_fidelity(original, broken, CalibrationSet({"x": x}, source="test"))
