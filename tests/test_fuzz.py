"""Mutation fuzzing (hypothesis, bounded): whatever comes in, no uncaught exception other than
our OnexoneError types, no hang, and every model written passes the checker and onnxruntime.

Four mutators: raw bytes of serialized models (flip, cut, splice), graph edits on the proto
(rewire an input, change an op, drop a node, corrupt a dim or an attribute), hostile pass
option values, and calibration arrays (NaN, inf, overflow, degenerate, odd dtypes, labels).
Each example is loaded, optionally rewritten, and saved; a watchdog kills a hung run.
"""

from __future__ import annotations

import faulthandler
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rewriter
from rewriter.errors import OnexoneError
from tests.builders import conv_model
from tests.conftest import ort_run, rapidocr_model
from tests.modelcheck import assert_bit_identical, seeded_feeds

EXAMPLES = 30
WATCHDOG_S = 300  # a single test taking this long is a hang: dump stacks and exit
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def watchdog():
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _seed_models() -> dict[str, bytes]:
    """Small real-shaped models: conv+relu, a dynamic-batch conv, and a two-conv chain."""
    chain = conv_model([1, 4, 8, 8], 8, [3, 3], pads=[1, 1, 1, 1], relu=True)
    return {
        "conv": conv_model([1, 3, 6, 6], 4, [3, 3], seed=1).SerializeToString(),
        "dynamic": conv_model(["n", 4, 8, 8], 8, [1, 1], seed=2, relu=True).SerializeToString(),
        "chain": chain.SerializeToString(),
    }


SEEDS = _seed_models()


def try_everything(data: bytes, tmp: Path, passes: list[str] | None = None) -> None:
    """load -> [rewrite] -> save; OnexoneError is a fine answer, anything else is a bug."""
    try:
        model = rewriter.load(data)
        if passes:
            model = rewriter.rewrite(model, passes).model
        out = rewriter.save(model, tmp / "fuzz.onnx")
    except OnexoneError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
        return
    check_written(data, out, same_outputs=not passes)


def check_written(data: bytes, out: Path, *, same_outputs: bool) -> None:
    """The written model passes the full checker and opens in onnxruntime; when the input ran,
    the output runs too (bit-identical after a plain round trip)."""
    onnx.checker.check_model(str(out), full_check=True)
    proto = onnx.load_from_string(data)
    feeds = seeded_feeds(proto, seed=0)
    try:
        expected = ort_run(data, feeds)
    except Exception:  # the mutated input itself does not run on these feeds
        ort_run(out, {}) if not feeds else _session_only(out)
        return
    got = ort_run(out, feeds)
    if same_outputs:
        assert_bit_identical(expected, got)


def _session_only(path: Path) -> None:
    import onnxruntime as ort

    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------ byte level


@st.composite
def byte_mutation(draw, seeds: dict[str, bytes] = SEEDS) -> bytes:
    data = bytearray(seeds[draw(st.sampled_from(sorted(seeds)))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "splice", "zero"]))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "splice":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at:at + 8] = bytes(len(data[at:at + 8]))
        if not data:
            break
    return bytes(data)


@settings(FUZZ, max_examples=2 * EXAMPLES)
@given(data=byte_mutation())
def test_byte_mutations(tmp_path, data):
    try_everything(data, tmp_path)


@FUZZ
@given(draw=st.data())
def test_zoo_and_ppocr_byte_mutations(tmp_path, zoo, draw):
    """Mutations of real exported models: a zoo model and the shipped PP-OCR classifier."""
    seeds = {"convnet_gap": zoo("convnet_gap").read_bytes(),
             "ppocr_cls": rapidocr_model("cls").read_bytes()}
    try_everything(draw.draw(byte_mutation(seeds)), tmp_path)


# ----------------------------------------------------------------------------- graph level

OPS = ["Relu", "Conv", "Add", "Identity", "Reshape", "Sigmoid", "MaxPool", "NotAnOp"]


@st.composite
def graph_mutation(draw) -> bytes:
    proto = onnx.load_from_string(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    graph = proto.graph
    names = [v.name for v in graph.input] + [i.name for i in graph.initializer] + [
        o for n in graph.node for o in n.output] + ["ghost"]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(
            ["rewire", "op", "drop", "dup", "dim", "attr", "dtype", "output"]))
        if not graph.node:
            break
        node = graph.node[draw(st.integers(0, len(graph.node) - 1))]
        if kind == "rewire" and node.input:
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(names))
        elif kind == "op":
            node.op_type = draw(st.sampled_from(OPS))
        elif kind == "drop":
            graph.node.remove(node)
        elif kind == "dup":
            graph.node.append(node)
        elif kind == "dim" and graph.initializer:
            init = graph.initializer[draw(st.integers(0, len(graph.initializer) - 1))]
            if init.dims:
                init.dims[draw(st.integers(0, len(init.dims) - 1))] = draw(
                    st.sampled_from([0, 1, 2, 7, -1, 10**9]))
        elif kind == "attr" and node.attribute:
            attr = node.attribute[draw(st.integers(0, len(node.attribute) - 1))]
            if attr.ints:
                attr.ints[0] = draw(st.sampled_from([0, -1, 5, 2**31]))
        elif kind == "dtype" and graph.initializer:
            graph.initializer[0].data_type = draw(st.sampled_from(
                [onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64, onnx.TensorProto.DOUBLE]))
        elif kind == "output":
            graph.output[0].name = draw(st.sampled_from(names))
    return proto.SerializeToString()


@FUZZ
@given(data=graph_mutation())
def test_graph_mutations_round_trip(tmp_path, data):
    try_everything(data, tmp_path)


@FUZZ
@given(data=graph_mutation())
def test_graph_mutations_rewrite(tmp_path, data):
    try_everything(data, tmp_path, ["cleanup"])


def test_fuzz_harness_accepts_unmutated_seeds(tmp_path):
    """Control: the seeds themselves load, rewrite and save (so the fuzz explores past load)."""
    for data in SEEDS.values():
        out = rewriter.save(rewriter.load(data), tmp_path / "seed.onnx")
        check_written(data, out, same_outputs=True)
        assert np.isfinite(ort_run(out, seeded_feeds(onnx.load(str(out))))[0]).all()


# ------------------------------------------------------------------- options and calibration

HOSTILE_VALUES = ["nan", "inf", "-inf", "-1", "-5", "0", "1", "1.5", "1e308", "-1e-300", "abc",
                  "", "2e62", "0.5", "true", "a*|b*"]
PASS_OPTIONS = {
    "bottleneck": ["ratio", "rank", "energy", "target", "min-cosine", "init", "mode", "round",
                   "min-channels", "min-macs", "shrink", "ridge", "max-positions",
                   "refit-reduce", "auto-steps"],
    "deepen": ["max-count", "include", "exclude"],
    "fold-bn": [],
    "cleanup": ["identity", "dedupe", "dead"],
    "merge-1x1": [],
    "dense-head": ["hidden", "pooled"],
}
INITS = ["svd", "whitened", "refit"]
FAST_EXAMPLES, SLOW_EXAMPLES = 12, 60


def _bottleneck_seed() -> bytes:
    return conv_model(["n", 16, 8, 8], 16, [3, 3], pads=[1] * 4, relu=True).SerializeToString()


def _calib_for(data: bytes, n: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    proto = onnx.load_from_string(data)
    shape = [d.dim_value or 1 for d in proto.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(seed).standard_normal((n, *shape[1:])).astype(np.float32)
    return {proto.graph.input[0].name: x}


def try_rewrite(data: bytes, passes: list[str], calib, tmp: Path, **kw) -> None:
    """rewrite -> save; an OnexoneError is a fine answer; a written model must be valid and
    finite on the calibration inputs."""
    try:
        result = rewriter.rewrite(rewriter.load(data), passes, calib=calib, **kw)
        if result.discarded:
            return  # the CLI would exit 1 and write nothing
        out = rewriter.save(result.model, tmp / "fuzz.onnx")
    except OnexoneError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
        return
    onnx.checker.check_model(str(out), full_check=True)
    for init in onnx.load(str(out)).graph.initializer:
        array = onnx.numpy_helper.to_array(init)
        if array.dtype.kind == "f":
            assert np.isfinite(array).all(), f"non-finite initializer {init.name} written"
    feeds = _calib_for(data, 2)  # finite inputs: a finite model must give finite outputs
    got = ort_run(out, feeds)
    assert all(np.isfinite(g).all() for g in got if g.dtype.kind == "f")


@st.composite
def pass_spec(draw) -> str:
    name = draw(st.sampled_from(sorted(PASS_OPTIONS)))
    keys = PASS_OPTIONS[name]
    options = {}
    for _ in range(draw(st.integers(0, 3)) if keys else 0):
        key = draw(st.sampled_from(keys))
        options[key] = draw(st.sampled_from(INITS if key == "init" else HOSTILE_VALUES))
    return name + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")


def _option_case(tmp_path, spec, with_calib):
    """Hostile option values (NaN, inf, negatives, huge, junk) on every pass: one-line errors
    or a valid, finite model, never an uncaught exception."""
    data = _bottleneck_seed()
    try_rewrite(data, [spec], _calib_for(data) if with_calib else None, tmp_path)


@settings(FUZZ, max_examples=FAST_EXAMPLES)
@given(spec=pass_spec(), with_calib=st.booleans())
def test_option_value_mutations(tmp_path, spec, with_calib):
    _option_case(tmp_path, spec, with_calib)


@pytest.mark.slow
@settings(FUZZ, max_examples=SLOW_EXAMPLES)
@given(spec=pass_spec(), with_calib=st.booleans())
def test_option_value_mutations_many(tmp_path, spec, with_calib):
    _option_case(tmp_path, spec, with_calib)


@st.composite
def calibration_mutation(draw) -> dict[str, np.ndarray]:
    n = draw(st.sampled_from([1, 2, 3, 16]))
    x = np.random.default_rng(draw(st.integers(0, 3))).standard_normal((n, 16, 8, 8))
    dtype = np.float32
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["nan", "inf", "huge", "zero", "constant", "tiny", "dtype",
                                     "labels"]))
        at = draw(st.integers(0, n - 1))
        if kind == "nan":
            x[at, 0, 0, 0] = np.nan
        elif kind == "inf":
            x[at].flat[draw(st.integers(0, 1023))] = np.inf
        elif kind == "huge":
            x[at] *= draw(st.sampled_from([3e38, 1e20, 1e17]))
        elif kind == "zero":
            x[:] = 0
        elif kind == "constant":
            x[:] = 1.0
        elif kind == "tiny":
            x *= 1e-30
        elif kind == "dtype":
            dtype = draw(st.sampled_from([np.float16, np.float64, np.int32]))
    with np.errstate(invalid="ignore", over="ignore"):
        arrays = {"x": x.astype(dtype)}
    if draw(st.booleans()):
        arrays["labels"] = draw(st.sampled_from([np.zeros(n, np.int64), np.zeros((n, 2)),
                                                 np.zeros(n + 1, np.int64)]))
    return arrays


def _calibration_case(tmp_path, calib, init):
    """NaN, inf, float32-overflowing, degenerate, tiny and odd-dtype calibration data with
    every fitting init: refused in one line or fitted to a valid, finite model."""
    passes = ["fold-bn"] if init == "fold" else [f"bottleneck:init={init}"]
    try_rewrite(_bottleneck_seed(), passes, dict(calib), tmp_path)


@settings(FUZZ, max_examples=FAST_EXAMPLES)
@given(calib=calibration_mutation(), init=st.sampled_from(INITS + ["fold"]))
def test_calibration_array_mutations(tmp_path, calib, init):
    _calibration_case(tmp_path, calib, init)


@pytest.mark.slow
@settings(FUZZ, max_examples=SLOW_EXAMPLES)
@given(calib=calibration_mutation(), init=st.sampled_from(INITS + ["fold"]))
def test_calibration_array_mutations_many(tmp_path, calib, init):
    _calibration_case(tmp_path, calib, init)
