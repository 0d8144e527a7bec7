"""The model zoo builds reproducibly, exports cleanly at every supported opset and matches
torch in onnxruntime; the shipped digits model and its data files are what they claim."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from models.export import (  # noqa: E402
    MAX_EXPORT_OPSET,
    export,
    export_module,
    main,
    run_onnx,
    verify_export,
)
from models.zoo import ZOO, build, count_macs, example_input  # noqa: E402
from tests.conftest import TRAINED  # noqa: E402

SMALL = ["convnet", "convnet_gap", "inception3a", "mobilenetv2"]
BIG = ["googlenet", "resnet50", "vgg16"]  # each export + check takes 2-20 s
OPSETS = sorted({11, 13, 17, MAX_EXPORT_OPSET})
built = functools.cache(build)  # read-only uses share one seeded instance per model


def _bn_count(module: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())


def _op_types(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


# ------------------------------------------------------------------------------ zoo


def test_zoo_has_the_documented_models():
    assert set(ZOO) == set(SMALL + BIG)


def test_zoo_entry_returns_model_and_batch1_shape():
    module, shape = ZOO["convnet"]()
    assert not module.training
    assert shape == (1, 1, 28, 28)
    assert module(example_input(shape)).shape == (1, 10)


def test_build_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_draw = torch.rand(1)
    torch.manual_seed(123)
    first, _ = build("mobilenetv2")
    assert torch.equal(torch.rand(1), expected_draw)
    second, _ = build("mobilenetv2")
    other, _ = build("mobilenetv2", seed=1)
    for (name, a), b, c in zip(
        first.state_dict().items(),
        second.state_dict().values(),
        other.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), name
        if a.is_floating_point() and a.numel() > 1:
            assert not torch.equal(a, c), name


def test_batchnorm_statistics_and_affines_are_non_trivial():
    module, _ = built("resnet50")
    for bn in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        assert (bn.running_var > 0).all()
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
        assert not torch.allclose(bn.bias, torch.zeros_like(bn.bias))


@pytest.mark.parametrize(
    "name, published",
    [
        ("inception3a", 128e6),  # GoogLeNet paper, Table 1
        ("googlenet", 1.586e9),  # paper Table 1 summed (5x5 branch); the text rounds to 1.5G
        ("resnet50", 4.1e9),
        ("vgg16", 15.5e9),
        ("mobilenetv2", 300e6),
    ],
)
def test_torch_macs_match_published_counts(name, published):
    module, shape = built(name)
    assert abs(count_macs(module, shape) - published) / published < 0.02


@pytest.mark.parametrize("name", SMALL + [pytest.param(n, marks=pytest.mark.slow) for n in BIG])
def test_zoo_export_passes_checker_and_matches_torch(zoo, name):
    path = zoo(name)
    module, shape = built(name)
    verify_export(path, module, example_input(shape))
    graph = onnx.load(str(path), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["input"]
    assert [o.name for o in graph.output] == ["output"]
    assert _op_types(path).count("BatchNormalization") == _bn_count(module)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("name", SMALL)
def test_small_zoo_exports_at_every_opset_with_dynamic_batch(tmp_path, name, opset):
    path = export(name, tmp_path, opset=opset, dynamic_batch=True)
    assert path == tmp_path / f"{name}.onnx"
    assert onnx.load(str(path)).opset_import[0].version == opset
    module, shape = built(name)
    verify_export(path, module, example_input(shape))
    batch3 = example_input((3, *shape[1:]), seed=1)
    (got,) = run_onnx(path, {"input": batch3.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, module(batch3).numpy(), rtol=1e-4, atol=1e-5)


def test_max_export_opset_matches_torch_legacy_exporter():
    constants = pytest.importorskip("torch.onnx._constants")
    torch_max = getattr(constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", None)
    if torch_max is None:
        pytest.skip("this torch does not expose its legacy exporter's max opset")
    assert torch_max == MAX_EXPORT_OPSET


def test_unsupported_opset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export("convnet", tmp_path, opset=MAX_EXPORT_OPSET + 1)


def test_export_is_byte_reproducible(tmp_path):
    first = export("mobilenetv2", tmp_path / "a.onnx")
    second = export("mobilenetv2", tmp_path / "b.onnx")
    assert first.read_bytes() == second.read_bytes()


def test_export_module_custom_names_and_restores_mode(tmp_path):
    module = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4)).train()
    path = export_module(
        module,
        torch.randn(1, 2, 6, 6),
        tmp_path / "sub" / "m.onnx",
        input_names=("x",),
        output_names=("y",),
        opset=13,
    )
    assert module.training
    graph = onnx.load(str(path)).graph
    assert (graph.input[0].name, graph.output[0].name) == ("x", "y")
    assert "BatchNormalization" in _op_types(path)


def test_verify_export_detects_a_mismatch(tmp_path):
    module, shape = build("convnet")
    path = export("convnet", tmp_path)
    with torch.no_grad():
        module[0].bias += 1.0
    with pytest.raises(AssertionError, match="differs from torch"):
        verify_export(path, module, example_input(shape))


def test_cli_exports_and_verifies(tmp_path, capsys):
    main(["convnet_gap", "-o", str(tmp_path), "--opset", "13", "--verify"])
    assert (tmp_path / "convnet_gap.onnx").exists()
    assert "verified" in capsys.readouterr().out


# ------------------------------------------------------------------------------ trained digits

DIGITS_ONNX = TRAINED / "digits_cnn.onnx"


def _npz(name: str) -> dict[str, np.ndarray]:
    with np.load(TRAINED / name) as data:
        return dict(data)


def test_shipped_digits_model_reaches_98_percent_in_onnxruntime():
    test = _npz("digits_test.npz")
    onnx.checker.check_model(str(DIGITS_ONNX), full_check=True)
    (logits,) = run_onnx(DIGITS_ONNX, {"input": test["input"]})
    assert logits.shape == (len(test["labels"]), 10)
    assert (logits.argmax(1) == test["labels"]).mean() >= 0.98


def test_shipped_digits_model_interface():
    graph = onnx.load(str(DIGITS_ONNX)).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert (graph.input[0].name, dims) == ("input", ["batch", 1, 28, 28])
    assert graph.output[0].name == "logits"
    ops = _op_types(DIGITS_ONNX)
    assert ops.count("BatchNormalization") == ops.count("Conv") >= 7


def test_digits_data_files_have_expected_keys_and_shapes():
    calib, test = _npz("digits_calib.npz"), _npz("digits_test.npz")
    for data, size in ((calib, 256), (test, 540)):
        assert set(data) == {"input", "labels"}
        assert data["input"].shape == (size, 1, 28, 28)
        assert data["input"].dtype == np.float32
        assert data["labels"].shape == (size,)
        assert data["labels"].dtype == np.int64
        assert set(np.unique(data["labels"])) == set(range(10))


def test_digits_metadata_agrees_with_files():
    meta = json.loads((TRAINED / "digits_cnn.json").read_text())
    assert meta["accuracy"] >= 0.98
    assert meta["split"] == {"train": 1257, "test": 540, "calibration": 256}
    total = sum(p.stat().st_size for p in TRAINED.glob("digits_*"))
    assert total < 5 * 2**20


def test_digits_pipeline_reproduces_shipped_data():
    pytest.importorskip("sklearn")
    from models.digits import CALIB_SIZE, calibration_subset, load_digits_split

    x_train, y_train, x_test, y_test = load_digits_split()
    assert x_train.shape == (1257, 1, 28, 28) and x_train.dtype == np.float32
    assert y_train.dtype == np.int64
    assert abs(float(x_train.mean())) < 1e-3 and abs(float(x_train.std()) - 1) < 1e-3
    test, calib = _npz("digits_test.npz"), _npz("digits_calib.npz")
    np.testing.assert_array_equal(test["labels"], y_test)
    np.testing.assert_allclose(test["input"], x_test, atol=1e-6)
    x_cal, y_cal = calibration_subset(x_train, y_train, CALIB_SIZE)
    np.testing.assert_array_equal(calib["labels"], y_cal)
    np.testing.assert_allclose(calib["input"], x_cal, atol=1e-6)


def test_digits_cnn_has_wide_3x3_convs_and_shift_keeps_shape():
    pytest.importorskip("sklearn")
    from models.digits import DigitsCNN, random_shift

    model = DigitsCNN().eval()
    wide = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.in_channels >= 64
    ]
    assert len(wide) >= 3
    x = torch.randn(4, 1, 28, 28)
    shifted = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    assert model(shifted).shape == (4, 10)
