"""A model over the 2 GB protobuf limit, with external data: loads, shape-infers, rewrites and
saves without holding two copies of its weights, and is validated before the rename.

Slow (writes ~2.3 GB to /tmp a few times); skipped with a reason when /tmp lacks the room.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest

import rewriter
from bench.bench_bigmodel import build_big_model, measure
from rewriter import io as rio
from rewriter.shapes import infer_shapes, static_shape
from tests.conftest import ROOT
from tests.harden_helpers import data_files, hashed_data_files

pytestmark = pytest.mark.slow

LAYERS, CHANNELS = 9, 8192  # 9 x 256 MiB = 2.25 GiB of float32 weights
WEIGHT_BYTES = LAYERS * CHANNELS * CHANNELS * 4
NEEDED_FREE = 10 * 2**30


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < NEEDED_FREE:
        pytest.skip(f"big-model tests need 10 GiB free in {tempfile.gettempdir()}, "
                    f"{free / 2**30:.1f} GiB available")
    return build_big_model(tmp_path_factory.mktemp("big") / "in", layers=LAYERS,
                           channels=CHANNELS)


def test_model_is_over_the_protobuf_limit(big_model):
    assert WEIGHT_BYTES > 2**31
    assert big_model.stat().st_size < 2**20  # the weights are all external
    assert (big_model.parent / "big.onnx.data").stat().st_size == WEIGHT_BYTES


def test_load_is_lazy_and_shapes_infer_past_2gb(big_model):
    model = rewriter.load(big_model)
    weight = model.graph.initializers["W0"].const_value
    assert isinstance(weight, onnx_ir_external())
    assert infer_shapes(model) is None
    values = {v.name: v for n in model.graph for v in n.outputs}
    assert [str(d) for d in values["c8"].shape] == ["batch", str(CHANNELS), "2", "2"]
    assert static_shape(values["c8"]) is None  # the batch stays symbolic
    assert rio.conv_weight_problem(model) is None


def onnx_ir_external():
    import onnx_ir as ir

    return ir.ExternalTensor


def test_save_peak_rss_below_two_copies(big_model, tmp_path):
    """A fresh process loads and saves; RSS above its imports stays under 1.5x the weights
    (two copies would be 2x; onnx.load + onnx.save is measured alongside for the README)."""
    ours = measure("onexone", big_model, tmp_path / "ours" / "out.onnx")
    assert ours["shape_inference_ok"] is True
    growth_mb = ours["peak_rss_mb"] - ours["import_rss_mb"]
    assert growth_mb < 1.5 * WEIGHT_BYTES / 2**20, ours
    out = tmp_path / "ours" / "out.onnx"
    (data,) = data_files(out)  # named by content hash: out.onnx.<hash8>.data
    assert data.stat().st_size == WEIGHT_BYTES
    onnx.checker.check_model(str(out), full_check=True)


def test_output_validated_on_temp_file_before_rename(big_model, tmp_path, monkeypatch):
    """validate_file sees the temp folder (final path absent); a failure leaves nothing."""
    seen = []
    original = rio.validate_file

    def spy(path, **kw):
        seen.append((path.parent.name.startswith(".onexone-"), (tmp_path / "o.onnx").exists()))
        return original(path, **kw)

    monkeypatch.setattr(rio, "validate_file", spy)
    monkeypatch.setattr(rio, "SESSION_CHECK_LIMIT", 2**40)  # force the onnxruntime check too
    written = rewriter.save(rewriter.load(big_model), tmp_path / "o.onnx")
    assert seen == [(True, False)] and written.exists()

    def failing(path, **kw):
        raise rewriter.ModelSaveError("forced failure")

    monkeypatch.setattr(rio, "validate_file", failing)
    with pytest.raises(rewriter.ModelSaveError):
        rewriter.save(rewriter.load(big_model), tmp_path / "never.onnx")
    assert not (tmp_path / "never.onnx").exists()
    assert hashed_data_files(tmp_path, "never.onnx") == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onexone-")]


def test_output_data_file_never_the_inputs(big_model):
    """Saving next to the input under the input's own name is refused before any write."""
    data = big_model.parent / "big.onnx.data"
    mtime = data.stat().st_mtime_ns
    with pytest.raises(rewriter.ModelSaveError, match="refusing to overwrite"):
        rewriter.save(rewriter.load(big_model), big_model)
    assert data.stat().st_mtime_ns == mtime


def test_rewrite_runs_and_matches(big_model, tmp_path):
    """cleanup through the CLI (exact, guarded) on the 2.25 GB model; output runs the same."""
    out = tmp_path / "rw.onnx"
    report = tmp_path / "r.json"
    result = subprocess.run(
        [sys.executable, "-m", "rewriter.cli", str(big_model), "--pass", "cleanup", "-o",
         str(out), "--report", str(report)],
        capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(report.read_text())["written"] is True
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((1, CHANNELS, 2, 2)).astype(np.float32)
    (want,) = ort.InferenceSession(str(big_model)).run(None, {"x": x})
    (got,) = ort.InferenceSession(str(out)).run(None, {"x": x})
    np.testing.assert_array_equal(got, want)
