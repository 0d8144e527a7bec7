"""merge-1x1: consecutive 1x1 convs merged when cheaper, exactly; refusals say why."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.builders import make_model
from tests.passcheck import assert_same_outputs, random_feeds, run_pass


def chain(channels: list[int], *, between: str | None = None, extra_reader: bool = False,
          first_kernel: int = 1, seed: int = 0) -> onnx.ModelProto:
    """x -> 1x1 conv -> [between op] -> 1x1 conv ... with the given channel widths."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for i, (c_in, c_out) in enumerate(zip(channels, channels[1:], strict=False)):
        k = first_kernel if i == 0 else 1
        weight = rng.standard_normal((c_out, c_in, k, k)).astype(np.float32) * 0.3
        inits += [numpy_helper.from_array(weight, f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), f"b{i}")]
        out = "y" if i == len(channels) - 2 else f"c{i}"
        nodes.append(helper.make_node("Conv", [current, f"w{i}", f"b{i}"], [out], name=f"conv{i}",
                                      pads=[k // 2] * 4))
        current = out
        if i == 0 and between:
            nodes.append(helper.make_node(between, [out], [f"{between}_out"], name=between.lower()))
            current = f"{between}_out"
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("c0", TensorProto.FLOAT, None))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, channels[0], 5, 5])
    return make_model(nodes, [x], outputs, inits)


def test_expanding_pair_merges_exactly():
    proto = chain([16, 32, 8])
    model, report = run_pass(proto, "merge-1x1")
    assert [n.op_type for n in model.graph] == ["Conv"]
    decision = report.decisions[0]
    assert decision.applied and decision.macs_after < decision.macs_before
    positions = 2 * 5 * 5  # batch 2, 5x5
    assert decision.macs_before == positions * (16 * 32 + 32 * 8)
    assert decision.macs_after == positions * 16 * 8
    assert_same_outputs(proto, model, random_feeds(proto), 1e-5)


def test_bottleneck_pair_is_left_alone():
    proto = chain([64, 8, 64])
    model, report = run_pass(proto, "merge-1x1")
    assert len(list(model.graph)) == 2
    assert "would not save MACs" in report.decisions[0].reason


def test_chain_merges_into_one_conv():
    proto = chain([8, 16, 16, 4])
    model, report = run_pass(proto, "merge-1x1")
    assert [n.op_type for n in model.graph] == ["Conv"] and report.n_applied == 2
    assert_same_outputs(proto, model, random_feeds(proto), 1e-5)


def test_nonlinearity_between_blocks_the_merge():
    proto = chain([16, 32, 8], between="Relu")
    model, report = run_pass(proto, "merge-1x1")
    assert len([n for n in model.graph if n.op_type == "Conv"]) == 2 and report.n_applied == 0


def test_refusals_name_their_reason():
    _, shared = run_pass(chain([16, 32, 8], extra_reader=True), "merge-1x1")
    assert shared.decisions[0].reason == "first conv output has other readers"
    _, spatial = run_pass(chain([16, 32, 8], first_kernel=3), "merge-1x1")
    assert "not a plain 1x1 conv" in spatial.decisions[0].reason
