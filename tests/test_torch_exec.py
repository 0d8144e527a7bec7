"""IR -> torch executor: each op against onnxruntime, real models, trainable weights, write-back."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.errors import PassError
from rewriter.io import load
from tests.builders import make_model
from tests.conftest import TRAINED, ort_run, rapidocr_model
from tests.passcheck import checked_proto, max_rel_error, random_feeds, text_image

torch = pytest.importorskip("torch")
from rewriter.torch_exec import to_torch, unsupported, write_back  # noqa: E402

RNG = np.random.default_rng(0)


def _run_both(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], dtype=torch.float32):
    model = load(proto)
    module = to_torch(model).to(dtype)
    with torch.no_grad():
        tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
        got = module(**{k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()})
    got = got if isinstance(got, tuple) else (got,)
    return ort_run(proto.SerializeToString(), feeds), [g.numpy() for g in got]


def check(nodes, x_shape, inits=(), opset=17, rtol=1e-5):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in nodes[-1].output]
    proto = make_model(nodes, [x], outs, list(inits), opset=opset)
    ref, got = _run_both(proto, random_feeds(proto))
    for r, g in zip(ref, got, strict=True):
        assert r.shape == g.shape
        assert max_rel_error(r, g) <= rtol


def w(name, *shape):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def i64(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def f32(name, values):
    return numpy_helper.from_array(np.array(values, np.float32), name)


N = helper.make_node


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 1, 1, 1]}, {"pads": [0, 1, 2, 0], "strides": [2, 1]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, {"auto_pad": "SAME_LOWER"},
    {"dilations": [2, 2], "group": 2, "pads": [2, 2, 2, 2]},
])
def test_conv(attrs):
    c_in = 4 // attrs.get("group", 1)
    inits = [w("W", 6, c_in, 3, 3), w("B", 6)]
    check([N("Conv", ["x", "W", "B"], ["y"], **attrs)], [1, 4, 9, 8], inits)


@pytest.mark.parametrize("attrs", [{"strides": [2, 2]}, {"strides": [2, 2], "pads": [1, 0, 0, 1],
                                                          "output_padding": [1, 1]}])
def test_conv_transpose(attrs):
    check([N("ConvTranspose", ["x", "W"], ["y"], **attrs)], [1, 4, 5, 5], [w("W", 4, 3, 3, 3)])


@pytest.mark.parametrize(("op", "attrs"), [
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    ("MaxPool", {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [0, 1, 2, 0]}),
])
def test_pools(op, attrs):
    check([N(op, ["x"], ["y"], **attrs)], [1, 3, 9, 8])


@pytest.mark.parametrize("node", [
    N("Relu", ["x"], ["y"]), N("LeakyRelu", ["x"], ["y"], alpha=0.2), N("Sigmoid", ["x"], ["y"]),
    N("HardSigmoid", ["x"], ["y"], alpha=0.3, beta=0.4), N("HardSwish", ["x"], ["y"]),
    N("PRelu", ["x", "slope"], ["y"]), N("Clip", ["x", "lo", "hi"], ["y"]),
    N("Clip", ["x", "", "hi"], ["y"]), N("GlobalAveragePool", ["x"], ["y"]),
    N("GlobalMaxPool", ["x"], ["y"]), N("Flatten", ["x"], ["y"], axis=2),
    N("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1]), N("Softmax", ["x"], ["y"], axis=1),
    N("Add", ["x", "slope"], ["y"]), N("Mul", ["x", "slope"], ["y"]),
    N("Sub", ["x", "slope"], ["y"]), N("Div", ["x", "lo2"], ["y"]),
    N("Concat", ["x", "x"], ["y"], axis=1), N("Reshape", ["x", "shape"], ["y"]),
    N("Pad", ["x", "pads"], ["y"], mode="reflect"), N("Pad", ["x", "pads", "cval"], ["y"]),
    N("Pad", ["x", "pads"], ["y"], mode="edge"),
    N("Split", ["x", "sizes"], ["y0", "y1"], axis=1), N("Split", ["x"], ["y0", "y1", "y2"], axis=1),
    N("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"]),
    N("ReduceMean", ["x"], ["y"], axes=[2, 3]),
])
def test_elementwise_and_shape_ops(node):
    inits = [w("slope", 3, 1, 1), f32("lo", -0.5), f32("hi", 0.7), f32("lo2", [2.0]),
             i64("shape", [0, -1, 4]), i64("pads", [0, 0, 1, 2, 0, 0, 2, 1]), f32("cval", 1.5),
             i64("sizes", [1, 2]), i64("starts", [-1, 1]), i64("ends", [-100, 7]),
             i64("axes", [2, 3]), i64("steps", [-2, 3])]
    check([node], [2, 3, 6, 8], inits)


def test_softmax_before_opset_13_flattens():
    check([N("Softmax", ["x"], ["y"], axis=1)], [2, 3, 4], opset=11)


@pytest.mark.parametrize("attrs", [{}, {"transA": 1, "alpha": 0.5}, {"transB": 1, "beta": 2.0}])
def test_gemm_and_matmul(attrs):
    a_shape = [5, 3] if attrs.get("transA") else [3, 5]
    b = w("B", 4, 5) if attrs.get("transB") else w("B", 5, 4)
    check([N("Gemm", ["x", "B", "C"], ["y"], **attrs)], a_shape, [b, w("C", 4)])
    check([N("MatMul", ["x", "B"], ["y"])], [2, 3, 5], [w("B", 5, 4)])


@pytest.mark.parametrize(("attrs", "scales"), [
    ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
     [1, 1, 2, 2]),
    ({"mode": "linear", "coordinate_transformation_mode": "half_pixel"}, [1, 1, 2, 3]),
    ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, [1, 1, 2, 2]),
    ({"mode": "nearest", "coordinate_transformation_mode": "half_pixel"}, [1, 1, 3, 2]),
])
def test_resize(attrs, scales):
    nodes = [N("Resize", ["x", "", "scales"], ["y"], **attrs)]
    check(nodes, [1, 2, 5, 4], [f32("scales", scales)])


def test_shape_plumbing_gather_unsqueeze_cast():
    nodes = [
        N("Shape", ["x"], ["s"]), N("Gather", ["s", "idx"], ["hw"], axis=0),
        N("Constant", [], ["minus1"], value_ints=[-1]),
        N("Concat", ["minus1", "hw"], ["shape"], axis=0), N("Reshape", ["x", "shape"], ["r"]),
        N("Unsqueeze", ["r", "ax0"], ["u"]), N("Squeeze", ["u", "ax0"], ["q"]),
        N("Cast", ["q"], ["c"], to=TensorProto.DOUBLE),
        N("Cast", ["c"], ["y"], to=TensorProto.FLOAT),
    ]
    check(nodes, [2, 3, 4, 5], [i64("idx", [2, 3]), i64("ax0", [0])])


def test_gather_with_a_scalar_index_gives_a_scalar():
    """`Shape -> Gather(scalar) -> Unsqueeze -> Concat -> Reshape`, as YOLO heads export it."""
    nodes = [
        N("Shape", ["x"], ["s"]), N("Gather", ["s", "zero"], ["batch"], axis=0),
        N("Unsqueeze", ["batch", "ax0"], ["b1"]),
        N("Constant", [], ["minus1"], value_ints=[-1]),
        N("Concat", ["b1", "minus1"], ["shape"], axis=0), N("Reshape", ["x", "shape"], ["y"]),
    ]
    check(nodes, [2, 3, 4, 5], [numpy_helper.from_array(np.array(0, np.int64), "zero"),
                                i64("ax0", [0])])


def test_unsupported_op_is_named():
    proto = make_model([N("Celu", ["x"], ["y"], name="odd")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = load(proto)
    assert unsupported(model) == [("Celu", "odd", "no torch implementation")]
    with pytest.raises(PassError, match=r"not fine-tunable: op Celu \(node odd\)"):
        to_torch(model)


def test_only_named_weights_train_and_write_back_by_name():
    proto = make_model(
        [N("Conv", ["x", "W.a", "B:b"], ["h"], name="c1"), N("Relu", ["h"], ["r"]),
         N("Conv", ["r", "W2"], ["y"], name="c2")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w("W.a", 3, 2, 1, 1), w("B:b", 3), w("W2", 2, 3, 1, 1)])
    model = load(proto)
    module = to_torch(model, trainable=["W2"])
    grads = {name: module.params[key].requires_grad for name, key in module.param_key.items()}
    assert grads == {"W.a": False, "B:b": False, "W2": True}
    with torch.no_grad():
        module.params[module.param_key["W2"]].mul_(2.0)
        module.params[module.param_key["W.a"]].mul_(3.0)  # not trainable: not written back
    assert write_back(module, model) == ["W2"]
    np.testing.assert_array_equal(model.graph.initializers["W2"].const_value.numpy(),
                                  2 * numpy_helper.to_array(proto.graph.initializer[2]))
    feeds = random_feeds(proto)
    before, after = ort_run(proto.SerializeToString(), feeds)[0], ort_run(
        checked_proto(model).SerializeToString(), feeds)[0]
    np.testing.assert_allclose(after, 2 * before, rtol=1e-5, atol=1e-6)
    with pytest.raises(PassError, match="not float weights"):
        to_torch(model, trainable=["h"])


def test_constant_node_weights_are_parameters_and_write_back():
    weight = RNG.standard_normal((2, 2, 1, 1)).astype(np.float32)
    proto = make_model(
        [N("Constant", [], ["cw"], value=numpy_helper.from_array(weight, "cw")),
         N("Conv", ["x", "cw"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = load(proto)
    module = to_torch(model, trainable=["cw"])
    with torch.no_grad():
        module.params[module.param_key["cw"]].zero_()
    write_back(module, model)
    out = ort_run(checked_proto(model).SerializeToString(), random_feeds(proto))[0]
    assert not out.any()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnet", "convnet_gap", "inception3a", "googlenet",
                                  "resnet50", "vgg16", "mobilenetv2"])
def test_zoo_models_match_onnxruntime(zoo, name):
    path = zoo(name)
    proto = onnx.load(str(path))
    ref, got = _run_both(proto, random_feeds(proto))
    assert max_rel_error(ref[0], got[0]) <= 1e-4


def test_trained_detector_matches_onnxruntime():
    """The YOLOv8-layout head (DFL Softmax, Split, Slice, scalar Gather, Sigmoid, Concat)."""
    proto = onnx.load(str(TRAINED / "detector.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    assert {"Softmax", "Split", "Slice", "Gather", "Sigmoid", "Concat", "Sub", "Div"} <= ops
    with np.load(TRAINED / "detector_calib.npz") as data:
        feeds = {"images": data["images"][:4]}
    ref, got = _run_both(proto, feeds)
    assert ref[0].shape == (4, 14, 189)
    assert max_rel_error(ref[0], got[0]) <= 1e-4


@pytest.mark.slow
def test_ppocr_det_matches_onnxruntime():
    path = rapidocr_model("det")
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert {"Resize", "ConvTranspose", "HardSigmoid", "Clip"} <= ops
    feeds = {"x": text_image(224, 320)}
    ref, got = _run_both(proto, feeds)
    assert ref[0].max() > 0.9  # the text is detected: a meaningful probability map
    assert max_rel_error(ref[0], got[0]) <= 1e-4
