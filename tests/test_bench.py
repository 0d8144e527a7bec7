"""rewriter.bench: interleaved A/B latency, feeds for fixed/dynamic batch dims, progress bars."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from rich.console import Console

import rewriter
from rewriter.bench import ab_latency, batch_feeds, benchmark_models, machine_info, stats_ms
from rewriter.calibration import CalibrationSet, model_input_specs
from rewriter.errors import CalibrationError
from rewriter.progress import show_progress, track
from rewriter.runtime import make_session, run_all
from tests.builders import conv_model


def ir_model(proto: onnx.ModelProto):
    return rewriter.load(proto)


def test_stats_ms_converts_and_orders():
    s = stats_ms([0.001, 0.002, 0.003, 0.004, 0.010])
    assert s["median"] == 3.0 and s["min"] == 1.0
    assert s["p10"] <= s["median"] <= s["p90"] <= 10.0


def test_ab_latency_sees_a_real_difference():
    """A 64-channel 3x3 conv against a 4-channel one: B is clearly faster (no timing threshold
    beyond 'faster', which a 16x MAC gap guarantees on any machine)."""
    big = make_session(ir_model(conv_model([1, 64, 32, 32], 64, [3, 3])), threads=1)
    small = make_session(ir_model(conv_model([1, 64, 32, 32], 4, [1, 1])), threads=1)
    feeds = {"x": np.ones((1, 64, 32, 32), np.float32)}
    ab = ab_latency(big, small, feeds, repeats=9, warmup=1)
    assert ab["repeats"] == 9 and ab["speedup"]["median"] > 1.0
    assert ab["a_ms"]["median"] > ab["b_ms"]["median"]
    assert ab["speedup"]["p10"] <= ab["speedup"]["median"] <= ab["speedup"]["p90"]


def test_repeats_adapt_to_time_budget():
    session = make_session(ir_model(conv_model([1, 3, 8, 8], 4, [1, 1])), threads=1)
    ab = ab_latency(session, session, {"x": np.zeros((1, 3, 8, 8), np.float32)}, min_time_s=0.01)
    from rewriter.bench import MAX_REPEATS, MIN_REPEATS

    assert MIN_REPEATS <= ab["repeats"] <= MAX_REPEATS


def test_benchmark_models_batches_threads_and_data():
    model = ir_model(conv_model(["N", 3, 8, 8], 4, [3, 3]))
    data = CalibrationSet({"x": np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(
        np.float32)})
    lat = benchmark_models(model, model.clone(), {}, threads=2, batches=[1, 5], data=data,
                           repeats=3)
    assert lat["threads"] == 2 and lat["batch"] == 1 and lat["inputs"] == "calibration samples"
    assert [b["batch"] for b in lat["batches"]] == [1, 5]
    assert lat["original_ms"] == lat["batches"][0]["original_ms"]
    assert lat["graph_optimization"] == "ALL"


def test_fixed_batch_model_runs_at_its_own_batch():
    model = ir_model(conv_model([1, 3, 8, 8], 4, [3, 3]))
    lat = benchmark_models(model, model, {}, batches=[1, 8], repeats=2)
    assert lat["batch"] == 1 and "batches" not in lat
    assert any("batch 8 ran as 1" in n for n in lat["notes"])


def test_feeds_need_shapes_for_dynamic_dims():
    specs = model_input_specs(ir_model(conv_model(["N", 3, "H", "W"], 4, [3, 3])))
    with pytest.raises(CalibrationError, match="--input-shape x"):
        batch_feeds(specs, 2, {}, None)
    feeds, size = batch_feeds(specs, 2, {"x": (1, 3, 5, 7)}, None)
    assert size == 2 and feeds["x"].shape == (2, 3, 5, 7)
    data = {"x": np.arange(3 * 3 * 4 * 4, dtype=np.float32).reshape(3, 3, 4, 4)}
    feeds, _ = batch_feeds(specs, 5, {}, data)
    np.testing.assert_array_equal(feeds["x"][3], data["x"][0])  # samples repeat to fill


def test_fixed_batch_one_model_takes_many_samples():
    """Calibration/fidelity over 7 samples on a model whose batch dim is fixed to 1."""
    proto = conv_model([1, 3, 6, 6], 2, [3, 3])
    x = np.random.default_rng(0).standard_normal((7, 3, 6, 6)).astype(np.float32)
    out = run_all(ir_model(proto), {"x": x})["y"]
    assert out.shape == (7, 2, 4, 4)
    single = run_all(ir_model(proto), {"x": x[3:4]})["y"]
    np.testing.assert_allclose(out[3:4], single, rtol=1e-6)


def test_progress_only_when_enabled():
    plain = Console(file=io.StringIO(), force_terminal=False)
    with show_progress(plain):
        assert list(track(range(3), "x")) == [0, 1, 2]
    assert plain.file.getvalue() == ""
    tty = Console(file=io.StringIO(), force_terminal=True, width=80)
    with show_progress(tty):
        assert list(track(range(3), "benchmark")) == [0, 1, 2]
    assert "benchmark" in tty.file.getvalue()
    assert list(track(range(2), "off")) == [0, 1]  # no reporter active: plain loop


def test_machine_info_names_cpu_and_versions():
    info = machine_info(threads=1)
    assert info["cores"] >= 1 and info["threads"] == 1 and info["onnxruntime"]
    assert isinstance(info["cpu"], str) and info["cpu"]
