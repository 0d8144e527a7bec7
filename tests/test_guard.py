"""The numerical guard: a pass that breaks its own declared bound has its output discarded.

The passes here are registered by this module only. `test-guard-broken` claims to be exact but
scales Conv weights by 1.1; `test-guard-copy` is exact (re-writes each weight unchanged);
`test-guard-bounded` declares a 1e-3 bound and moves outputs by ~10%; `test-guard-unrunnable`
makes a model onnxruntime cannot run. API: the model continues without the offending pass and
`result.discarded` names it. CLI: InternalCheckError, exit 1, one line, nothing written.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from rewriter.passes import RewritePass, register

import rewriter
from rewriter.cli import main
from rewriter.errors import InternalCheckError
from rewriter.graph import Namer, const_array, nodes_by_op, set_constant_input
from rewriter.pipeline import EXACT_TOLERANCE
from tests.builders import conv_model
from tests.conftest import ort_run
from tests.modelcheck import assert_bit_identical, assert_valid, seeded_feeds
from tests.test_bad_input import assert_one_line_error


class _ScaleWeights(RewritePass):
    """Multiply every constant Conv weight by `factor` (1.0 = an exact no-op rewrite)."""

    factor = 1.0

    def apply(self, model: ir.Model) -> None:
        namer = Namer(model)
        for node in nodes_by_op(model, ["Conv"]):
            weight = const_array(node.inputs[1])
            if weight is None:
                self.report.skipped(node.name, node.op_type, "weight computed at run time")
                continue
            set_constant_input(model.graph, node, 1, weight * np.float32(self.factor), namer,
                               f"{node.name}_W")
            self.report.applied(node.name, node.op_type, f"weight x{self.factor:g}")


@register
class BrokenExactPass(_ScaleWeights):
    name = "test-guard-broken"
    summary = "(tests only) claims exact, scales Conv weights by 1.1"
    exact = True
    factor = 1.1


@register
class CopyExactPass(_ScaleWeights):
    name = "test-guard-copy"
    summary = "(tests only) exact: rewrites each Conv weight unchanged"
    exact = True
    factor = 1.0


@register
class BoundedPass(_ScaleWeights):
    name = "test-guard-bounded"
    summary = "(tests only) declares error <= 1e-3, moves outputs ~10%"
    factor = 1.1

    def apply(self, model: ir.Model) -> None:
        super().apply(model)
        self.report.error_bound = 1e-3


@register
class UnrunnablePass(RewritePass):
    name = "test-guard-unrunnable"
    summary = "(tests only) gives the first Conv a weight with the wrong channel count"
    exact = True

    def apply(self, model: ir.Model) -> None:
        node = nodes_by_op(model, ["Conv"])[0]
        weight = const_array(node.inputs[1])
        bad = np.zeros((weight.shape[0], weight.shape[1] + 1, *weight.shape[2:]), weight.dtype)
        set_constant_input(model.graph, node, 1, bad, Namer(model), f"{node.name}_W")
        self.report.applied(node.name, node.op_type, "wrong weight")


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model([1, 4, 8, 8], 8, [3, 3], pads=[1, 1, 1, 1], relu=True), path)
    return path


def _outputs(model: ir.Model, tmp_path, name: str) -> list[np.ndarray]:
    written = rewriter.save(model, tmp_path / name)
    return assert_valid(written, seeded_feeds(onnx.load(str(written)), seed=5))


@pytest.mark.parametrize("broken", ["test-guard-broken", "test-guard-bounded",
                                    "test-guard-unrunnable"])
def test_broken_pass_output_discarded(model_path, tmp_path, broken):
    result = rewriter.rewrite(rewriter.load(model_path), [broken])
    assert len(result.discarded) == 1 and broken in result.discarded[0]
    report = result.report.passes[0]
    assert report.metrics["discarded"] is True
    assert any("discarded" in note for note in report.notes)
    assert any("internal check failed" in w for w in result.report.warnings)
    original = ort_run(model_path, seeded_feeds(onnx.load(str(model_path)), seed=5))
    assert_bit_identical(original, _outputs(result.model, tmp_path, "out.onnx"))


def test_broken_exact_reports_its_error(model_path):
    result = rewriter.rewrite(rewriter.load(model_path), ["test-guard-broken"])
    assert "declared output error <= 0.0001" in result.discarded[0]
    assert result.report.passes[0].metrics["guard_rel_l2"] > 0.05


def test_correct_exact_pass_passes_guard(model_path, tmp_path):
    result = rewriter.rewrite(rewriter.load(model_path), ["test-guard-copy"])
    assert result.discarded == []
    assert result.report.passes[0].n_applied == 1
    assert result.report.passes[0].metrics["guard_rel_l2"] <= EXACT_TOLERANCE
    _outputs(result.model, tmp_path, "out.onnx")


def test_later_passes_run_on_the_restored_model(model_path, tmp_path):
    result = rewriter.rewrite(rewriter.load(model_path),
                              ["test-guard-broken", "test-guard-copy"])
    assert len(result.discarded) == 1
    assert result.report.passes[1].n_applied == 1
    assert "discarded" not in result.report.passes[1].metrics
    original = ort_run(model_path, seeded_feeds(onnx.load(str(model_path)), seed=5))
    np.testing.assert_allclose(_outputs(result.model, tmp_path, "out.onnx")[0], original[0],
                               rtol=1e-5, atol=1e-6)


def test_guard_off_when_requested(model_path):
    """guard=False is the API's explicit opt-out: nothing is checked or discarded."""
    result = rewriter.rewrite(rewriter.load(model_path), ["test-guard-broken"], guard=False)
    assert result.discarded == [] and result.report.passes[0].n_applied == 1


def test_cli_exits_1_and_writes_nothing(model_path, tmp_path, capfd):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main([str(model_path), "--pass", "test-guard-broken", "-o", str(out),
                 "--report", str(report)])
    captured = capfd.readouterr()
    line = assert_one_line_error(subprocess.CompletedProcess([], code, captured.out, captured.err),
                                 "test-guard-broken", "nothing written")
    assert "declared output error" in line
    assert not out.exists()
    assert not list(tmp_path.glob(".onexone-*"))
    data = json.loads(report.read_text())
    assert data["passes"][0]["metrics"]["discarded"] is True


def test_internal_check_error_is_an_exit_1_error():
    assert issubclass(InternalCheckError, rewriter.OnexoneError)
    assert InternalCheckError.exit_code == 1


# ------------------------------------------------------------------------------ float16


def float16_model(path):
    """x(fp16) -> Conv -> BatchNorm -> Relu -> Conv, all weights float16."""
    rng = np.random.default_rng(0)

    def w(name, shape, positive=False):
        values = rng.uniform(0.5, 1.5, shape) if positive else rng.standard_normal(shape) * 0.2
        return onnx.numpy_helper.from_array(values.astype(np.float16), name)

    helper = onnx.helper
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["a", "s", "b", "m", "v"], ["bn"],
                              name="bn1"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    fp16 = onnx.TensorProto.FLOAT16
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", fp16, ["n", 16, 8, 8])],
        [helper.make_tensor_value_info("y", fp16, ["n", 32, 8, 8])],
        [w("W1", (32, 16, 3, 3)), w("s", (32,), True), w("b", (32,)), w("m", (32,)),
         w("v", (32,), True), w("W2", (32, 32, 3, 3))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_exact_tolerance_scales_with_dtype():
    from rewriter.pipeline import exact_tolerance

    assert exact_tolerance([np.zeros(2, np.float32)]) == EXACT_TOLERANCE
    assert exact_tolerance([np.zeros(2, np.float16)]) == pytest.approx(8 * 2**-10)
    assert exact_tolerance([np.zeros(2, np.int64)]) == EXACT_TOLERANCE


def test_float16_exact_pass_kept_and_written_float16(tmp_path):
    """fold-bn computes in float32 and writes float16: rounding (~3e-4) is not a bug."""
    source = float16_model(tmp_path / "fp16.onnx")
    result = rewriter.rewrite(rewriter.load(source), ["fold-bn"])
    assert result.discarded == [] and result.report.passes[0].n_applied == 1
    written = rewriter.save(result.model, tmp_path / "out.onnx")
    proto = onnx.load(str(written))
    assert {i.data_type for i in proto.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 16, 8, 8)).astype(np.float16)}
    (want,), (got,) = ort_run(source, feeds), assert_valid(written, feeds)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2e-2,
                               atol=2e-2)


def test_float16_broken_pass_still_discarded(tmp_path):
    source = float16_model(tmp_path / "fp16.onnx")
    result = rewriter.rewrite(rewriter.load(source), ["test-guard-broken"])
    assert len(result.discarded) == 1
