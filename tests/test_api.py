"""The Python API: calibration from iterators and readers, save(result), cheap import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import rewriter
from rewriter.errors import CalibrationError
from tests.builders import conv_model


def _model():
    return rewriter.load(conv_model([1, 16, 8, 8], 16, [3, 3], pads=[1, 1, 1, 1]))


def _samples(n: int = 12) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 16, 8, 8)).astype(np.float32)


def test_calib_from_a_generator_of_batches_or_samples_equals_the_dict():
    x = _samples()
    by_dict = rewriter.rewrite(_model(), ["bottleneck:ratio=0.5"], calib={"x": x})
    batches = rewriter.rewrite(
        _model(), ["bottleneck:ratio=0.5"], calib=({"x": x[i : i + 4]} for i in range(0, 12, 4))
    )
    singles = rewriter.rewrite(_model(), ["bottleneck:ratio=0.5"], calib=iter({"x": s} for s in x))
    assert by_dict.report.fidelity["samples"] == batches.report.fidelity["samples"] == 3
    for other in (batches, singles):
        assert other.report.fidelity["cosine"] == pytest.approx(by_dict.report.fidelity["cosine"])
        assert other.report.macs_after == by_dict.report.macs_after < other.report.macs_before


def test_calib_from_an_onnxruntime_calibration_data_reader():
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": b} for b in np.split(_samples(), 3)])

        def get_next(self):
            return next(self.items, None)

    result = rewriter.rewrite(_model(), ["bottleneck:ratio=0.5"], calib=Reader())
    assert result.report.fidelity["samples"] == 3
    assert result.calibration is not None and result.calibration.n == 9


def test_bad_stream_items_name_the_problem():
    with pytest.raises(CalibrationError, match="item 1 has no array for input"):
        rewriter.rewrite(_model(), ["cleanup"], calib=iter([{"x": _samples(2)}, {"y": 1}]))
    with pytest.raises(CalibrationError, match="yielded no samples"):
        rewriter.rewrite(_model(), ["cleanup"], calib=iter([]))
    with pytest.raises(CalibrationError, match="expected a dict"):
        rewriter.rewrite(_model(), ["cleanup"], calib=iter([_samples(2)]))


def test_save_given_the_result_completes_its_report(tmp_path):
    result = rewriter.rewrite(_model(), ["bottleneck:ratio=0.5"], calib={"x": _samples()})
    assert not result.report.written and result.report.file_size_after is None
    written = rewriter.save(result, tmp_path / "out.onnx")
    report = result.report.to_dict()
    assert report["written"] is True and report["output"] == str(written)
    assert report["file_size_after"] == written.stat().st_size > 0
    plain = rewriter.save(result.model, tmp_path / "plain.onnx")
    assert plain.read_bytes() == written.read_bytes()


def test_import_starts_no_runtime_and_the_package_is_typed():
    code = ("import sys, rewriter, rewriter.passes; print(sorted(m for m in ('onnxruntime', "
            "'onnx', 'onnx_ir', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    from pathlib import Path

    assert (Path(rewriter.__file__).parent / "py.typed").exists()
    doc = rewriter.rewrite.__doc__
    for term in ("CalibrationDataReader", "iterator", "guard", "holdout", "key=value", "+"):
        assert term in doc, term


def test_demo_writes_under_the_current_directory():
    from pathlib import Path

    from rewriter import demo

    args = demo.demo_args()
    outputs = [args[i + 1] for i, a in enumerate(args) if a in ("-o", "--report")]
    assert outputs and all(not Path(o).is_absolute() for o in outputs)
    assert all(Path(o).parts[0] == "onexone-demo" for o in outputs)
    assert Path(args[0]).is_file()  # the shipped model, found installed or in the repository
