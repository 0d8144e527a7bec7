"""Load -> save round trips: the written model is valid and computes exactly what the input did.

Covers every zoo model, the three PP-OCR models shipped in rapidocr-onnxruntime, a model with an
If subgraph, one with a custom-domain node, and one saved with external data.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import rewriter
from tests.builders import conv_model, make_model
from tests.conftest import ort_run, rapidocr_model
from tests.harden_helpers import data_files
from tests.modelcheck import (
    assert_bit_identical,
    assert_same_structure,
    assert_valid,
    seeded_feeds,
)

SMALL_ZOO = ["convnet", "convnet_gap", "inception3a", "mobilenetv2"]
BIG_ZOO = ["googlenet", "resnet50", "vgg16"]
PPOCR_SHAPES = {"det": (1, 3, 64, 96), "rec": (1, 3, 48, 160), "cls": (1, 3, 48, 192)}


def round_trip(source: Path, out: Path, feeds: dict[str, np.ndarray] | None = None) -> None:
    """load -> save, then assert validity, bit-identical outputs and unchanged structure."""
    written = rewriter.save(rewriter.load(source), out)
    original = onnx.load(str(source))
    if feeds is None:
        feeds = seeded_feeds(original, seed=1)
    outputs = assert_valid(written, feeds)
    assert_bit_identical(ort_run(source, feeds), outputs)
    assert_same_structure(original, onnx.load(str(written)))


@pytest.mark.parametrize("name", SMALL_ZOO)
def test_zoo_round_trip(zoo, tmp_path, name):
    round_trip(zoo(name), tmp_path / f"{name}.onnx")


@pytest.mark.slow
@pytest.mark.parametrize("name", BIG_ZOO)
def test_big_zoo_round_trip(zoo, tmp_path, name):
    round_trip(zoo(name), tmp_path / f"{name}.onnx")


@pytest.mark.parametrize("kind", ["det", "rec", "cls"])
def test_ppocr_round_trip(tmp_path, kind):
    source = rapidocr_model(kind)
    feeds = seeded_feeds(onnx.load(str(source)), seed=2, overrides={"x": PPOCR_SHAPES[kind]})
    round_trip(source, tmp_path / f"{kind}.onnx", feeds)


def test_ppocr_metadata_survives(tmp_path):
    """The rec model carries its 6,623-character dictionary in metadata_props."""
    source = rapidocr_model("rec")
    written = rewriter.save(rewriter.load(source), tmp_path / "rec.onnx")
    meta = {p.key: p.value for p in onnx.load(str(written)).metadata_props}
    assert len(meta["character"].splitlines()) > 6000


def test_symbolic_dims_survive_round_trip(tmp_path):
    source = tmp_path / "dyn.onnx"
    onnx.save(conv_model(["batch", 4, "h", "w"], 8, [3, 3], pads=[1, 1, 1, 1]), source)
    written = rewriter.save(rewriter.load(source), tmp_path / "out.onnx")
    dims = onnx.load(str(written)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 4, "h", "w"]


def if_model() -> onnx.ModelProto:
    """y = cond ? Conv(x) : x * 2, with the Conv weight read from the outer scope."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "W")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    out_info = helper.make_tensor_value_info
    then_graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["then_y"], name="then_conv")],
        "then", [], [out_info("then_y", TensorProto.FLOAT, [1, 4, 5, 5])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["else_y"], name="else_mul")],
        "else", [], [out_info("else_y", TensorProto.FLOAT, [1, 4, 5, 5])],
    )
    node = helper.make_node("If", ["cond"], ["y"], name="branch",
                            then_branch=then_graph, else_branch=else_graph)
    inputs = [out_info("cond", TensorProto.BOOL, []),
              out_info("x", TensorProto.FLOAT, [1, 4, 5, 5])]
    return make_model([node], inputs, [out_info("y", TensorProto.FLOAT, [1, 4, 5, 5])],
                      [weight, two])


@pytest.mark.parametrize("cond", [True, False])
def test_if_subgraph_round_trip(tmp_path, cond):
    source = tmp_path / "if.onnx"
    onnx.save(if_model(), source)
    feeds = {"cond": np.array(cond), "x": np.random.default_rng(3).standard_normal((1, 4, 5, 5))
             .astype(np.float32)}
    round_trip(source, tmp_path / "out.onnx", feeds)
    written = onnx.load(str(tmp_path / "out.onnx"))
    assert written.graph.node[0].attribute == onnx.load(str(source)).graph.node[0].attribute


def custom_domain_model() -> onnx.ModelProto:
    """Relu -> my.domain::Frobnicate -> Relu; onnxruntime cannot run it, onnx cannot infer it."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="pre"),
        helper.make_node("Frobnicate", ["a"], ["b"], name="custom", domain="my.domain",
                         alpha=0.5, mode="fast"),
        helper.make_node("Relu", ["b"], ["y"], name="post"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("my.domain", 1)])
    model.ir_version = 8
    return model


def test_custom_domain_node_kept_untouched(tmp_path):
    source = tmp_path / "custom.onnx"
    onnx.save(custom_domain_model(), source)
    written = rewriter.save(rewriter.load(source), tmp_path / "out.onnx")
    onnx.checker.check_model(str(written), full_check=True)
    before, after = onnx.load(str(source)), onnx.load(str(written))
    assert after.graph.node[1] == before.graph.node[1]
    assert_same_structure(before, after)
    dims = after.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["n", 8]


def test_contrib_op_round_trip(tmp_path):
    """A com.microsoft contrib op (FusedConv) runs in onnxruntime and comes back bit-identical."""
    rng = np.random.default_rng(4)
    weight = numpy_helper.from_array(rng.standard_normal((4, 8, 3, 3)).astype(np.float32), "W")
    node = helper.make_node("FusedConv", ["x", "W"], ["y"], name="fused", domain="com.microsoft",
                            activation="Relu", pads=[1, 1, 1, 1])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], [weight])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    proto.ir_version = 8
    source = tmp_path / "fused.onnx"
    onnx.save(proto, source)
    round_trip(source, tmp_path / "out.onnx")


def test_external_data_round_trip(tmp_path):
    """Written back as external data next to the output; the input's data file is untouched."""
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    source = src_dir / "ext.onnx"
    onnx.save(conv_model([1, 16, 12, 12], 32, [3, 3], relu=True), source,
              save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    data_file = src_dir / "ext.onnx.data"
    before = data_file.read_bytes()
    mtime = data_file.stat().st_mtime_ns
    out = out_dir / "rt.onnx"
    round_trip(source, out)
    written = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in written.graph.initializer for e in t.external_data
                 if e.key == "location"}
    (location,) = locations  # named by content hash: rt.onnx.<hash8>.data
    assert re.fullmatch(r"rt\.onnx\.[0-9a-f]{8}\.data", location)
    assert (out_dir / location).is_file()
    assert data_file.read_bytes() == before and data_file.stat().st_mtime_ns == mtime


def test_external_data_saved_beside_input_gets_its_own_file(tmp_path):
    source = tmp_path / "ext.onnx"
    onnx.save(conv_model([1, 8, 6, 6], 8, [1, 1]), source, save_as_external_data=True,
              location="ext.onnx.data", size_threshold=0)
    before = (tmp_path / "ext.onnx.data").read_bytes()
    round_trip(source, tmp_path / "ext2.onnx")
    assert (tmp_path / "ext.onnx.data").read_bytes() == before
    assert all(p.is_file() for p in data_files(tmp_path / "ext2.onnx"))  # small: maybe inline


def test_save_is_deterministic(tmp_path):
    source = tmp_path / "m.onnx"
    onnx.save(conv_model([1, 4, 8, 8], 8, [3, 3]), source)
    a = rewriter.save(rewriter.load(source), tmp_path / "a.onnx")
    b = rewriter.save(rewriter.load(source), tmp_path / "b.onnx")
    assert a.read_bytes() == b.read_bytes()


def test_load_accepts_bytes_and_proto(tmp_path):
    proto = conv_model([1, 4, 8, 8], 8, [3, 3])
    for source in (proto, proto.SerializeToString()):
        written = rewriter.save(rewriter.load(source), tmp_path / "m.onnx")
        assert_same_structure(proto, onnx.load(str(written)))


def test_saved_initializers_carry_no_stale_value_info(tmp_path):
    """Tools that rewrite weights after us (onnxruntime's int8 quantizer) must not trip over
    value_info entries for initializers: a plain round trip writes none."""
    from onnxruntime.quantization import quantize_dynamic

    from tests.conftest import TRAINED

    out = tmp_path / "digits.onnx"
    rewriter.save(rewriter.load(TRAINED / "digits_cnn.onnx"), out)
    proto = onnx.load(str(out))
    initializers = {t.name for t in proto.graph.initializer}
    assert not [v.name for v in proto.graph.value_info if v.name in initializers]
    quantize_dynamic(str(out), str(tmp_path / "digits.int8.onnx"))
    onnx.checker.check_model(str(tmp_path / "digits.int8.onnx"), full_check=True)
