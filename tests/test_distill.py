"""distill: only new weights train, against the original's outputs, deterministically."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.calibration import CalibrationSet
from rewriter.errors import PassError
from rewriter.io import load
from tests.builders import make_model
from tests.conftest import TRAINED, ort_run
from tests.passcheck import checked_proto, run_pass

torch = pytest.importorskip("torch")
from rewriter.distill import distill, new_weight_names, parse_distill_options  # noqa: E402
from rewriter.pipeline import rewrite  # noqa: E402


def teacher() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w1"),
        numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.3, "w2"),
    ]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"], name="relu1"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return make_model(nodes, [x], [y], inits)


def data(n: int, seed: int) -> CalibrationSet:
    x = np.random.default_rng(seed).standard_normal((n, 3, 6, 6)).astype(np.float32)
    return CalibrationSet({"x": x}, source="test")


def damaged_student():
    """deepen adds an identity 1x1 after relu1; its weight is then perturbed (a lossy init)."""
    original = load(teacher())
    model, _ = run_pass(teacher(), "deepen")
    (new_w,) = [n for n in new_weight_names(original, model) if n.endswith("_weight")]
    value = model.graph.initializers[new_w]
    noise = np.random.default_rng(1).standard_normal(value.const_value.shape).astype(np.float32)
    value.const_value = onnx_ir_tensor(value.const_value.numpy() + 0.3 * noise, new_w)
    return original, model


def onnx_ir_tensor(array, name):
    import onnx_ir as ir

    return ir.tensor(array, name=name)


def holdout_error(original, model, held: CalibrationSet) -> float:
    ref = ort_run(checked_proto(original).SerializeToString(), held.inputs)[0]
    got = ort_run(checked_proto(model).SerializeToString(), held.inputs)[0]
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def test_trains_only_new_weights_and_recovers_fidelity():
    original, model = damaged_student()
    old = {k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items()}
    held = data(32, 2)
    err_before = holdout_error(original, model, held)
    report = distill(original, model, data(128, 1), held, "steps=150,lr=0.01", seed=0)
    err_after = holdout_error(original, model, held)
    trained = {d.node for d in report.decisions if d.applied}
    assert trained == set(new_weight_names(original, model))
    for name, array in old.items():
        now = model.graph.initializers[name].const_value.numpy()
        assert np.array_equal(now, array) == (name not in trained), name
    assert report.metrics["loss_after"] < report.metrics["loss_before"]
    assert err_after < 0.5 * err_before, (err_before, err_after)


def test_same_seed_same_weights():
    results = []
    for _ in range(2):
        original, model = damaged_student()
        distill(original, model, data(64, 1), data(16, 2), {"steps": 20, "lr": 0.01}, seed=3)
        results.append({k: v.const_value.numpy() for k, v in model.graph.initializers.items()})
    assert results[0].keys() == results[1].keys()
    assert all(np.array_equal(results[0][k], results[1][k]) for k in results[0])


def test_nothing_new_to_train_is_reported():
    original, model = load(teacher()), load(teacher())
    report = distill(original, model, data(8, 1), None, {"steps": 5})
    assert report.n_applied == 0 and "no weights to train" in report.decisions[0].reason


def test_unsupported_op_leaves_model_untrained():
    proto = teacher()
    proto.graph.node[1].op_type = "Celu"
    original, model = load(proto), load(proto)
    report = distill(original, model, data(8, 1), None, {"steps": 5, "train": "all"})
    assert "not fine-tunable: op Celu (node relu1)" in report.decisions[0].reason


def test_needs_calibration_and_parses_options():
    with pytest.raises(PassError, match="needs calibration"):
        distill(load(teacher()), load(teacher()), None, None)
    opts = parse_distill_options("steps=7,lr=0.02,train=new|conv*")
    assert (opts.steps, opts.lr, opts.train) == (7, 0.02, ["new", "conv*"])
    with pytest.raises(PassError, match="unknown option"):
        parse_distill_options("epochs=3")
    with pytest.raises(PassError, match="not key=value"):
        parse_distill_options("steps")


def test_pipeline_reports_fidelity_before_and_after():
    calib = data(48, 5).inputs
    result = rewrite(load(teacher()), ["deepen"], calib=calib,
                     distill={"steps": 10, "lr": 1e-3, "keep_worse": True})
    step = result.report.passes[-1]
    assert step.name == "distill"
    assert {"fidelity_before", "fidelity_after", "loss_before", "loss_after"} <= set(step.metrics)
    assert step.metrics["fidelity_before"]["cosine"] > 0.999  # deepen is exact


def test_cli_distill_flag(tmp_path):
    from rewriter.cli import main

    path = tmp_path / "t.onnx"
    onnx.save(teacher(), str(path))
    np.savez(tmp_path / "calib.npz", x=data(24, 4).inputs["x"])
    report = tmp_path / "r.json"
    code = main([str(path), "--pass", "deepen", "--calib", str(tmp_path / "calib.npz"),
                 "--distill", "steps=5,keep-worse=true", "--report", str(report), "-q"])
    assert code == 0
    import json

    passes = json.loads(report.read_text())["passes"]
    assert [p["name"] for p in passes] == ["deepen", "distill"]


@pytest.mark.slow
def test_digits_bottleneck_then_distill_keeps_accuracy():
    calib = dict(np.load(TRAINED / "digits_calib.npz"))
    test = dict(np.load(TRAINED / "digits_test.npz"))
    # Data-free SVD init (refit alone already keeps accuracy at 70%): distillation must recover.
    result = rewrite(str(TRAINED / "digits_cnn.onnx"),
                     ["fold-bn", "bottleneck:target=0.7,init=svd,mode=in"],
                     calib=calib, distill={"steps": 150, "lr": 2e-3})
    assert result.report.macs_after <= 0.3 * result.report.macs_before
    step = result.report.passes[-1]
    assert step.n_applied > 0 and step.metrics["loss_after"] < 0.2 * step.metrics["loss_before"]
    def accuracy(model) -> float:
        logits = ort_run(checked_proto(model).SerializeToString(), {"input": test["input"]})[0]
        return float(np.mean(np.argmax(logits, axis=1) == test["labels"]))

    acc = {"original": accuracy(result.original), "rewritten": accuracy(result.model)}
    assert acc["rewritten"] >= acc["original"] - 0.005, acc


def test_loss_has_one_term_per_output_group_scaled_by_its_own_size():
    """A detector's box rows are ~100x its score rows; each group's term is scaled by its own
    mean square so the scores are not drowned (a whole-output loss would ignore them)."""
    from rewriter.distill import loss_terms
    from rewriter.groups import parse_groups

    teacher = {"out": np.concatenate([np.full((2, 4, 5), 100.0), np.full((2, 2, 5), 0.5)], 1),
               "aux": np.ones((2, 3))}
    teacher["out"][:, 5] = 0.1  # a second score row of another size: its own strided term
    groups = parse_groups("out:box=0-3+cls=4-4+kv=5-5%2")
    terms = loss_terms(["out", "aux"], groups, teacher)
    assert [(name, rows, label) for name, rows, label, _ in terms] == [
        ("out", (1, 0, 4, 1), "out:box"), ("out", (1, 4, 5, 1), "out:cls"),
        ("out", (1, 5, 6, 2), "out:kv"), ("aux", None, "aux")]
    assert [round(scale, 6) for *_, scale in terms] == [10000.0, 0.25, 0.01, 1.0]


def test_mirrored_doubles_image_batches_only():
    from rewriter.distill import mirrored

    images = {"x": np.arange(2 * 1 * 2 * 3, dtype=np.float32).reshape(2, 1, 2, 3)}
    both = mirrored(images)["x"]
    assert both.shape == (4, 1, 2, 3)
    np.testing.assert_array_equal(both[2:], images["x"][..., ::-1])
    tokens = {"ids": np.zeros((2, 7), np.int64)}
    assert mirrored(tokens)["ids"].shape == (2, 7)
