"""Does a factorized conv run faster than the original in onnxruntime, on this machine?

MACs are a poor guide to time for small 1x1 convs: a 1x1 reduce on a large early feature map is
memory-bound, and a kxk conv fed a handful of channels runs its GEMM at low efficiency. So the
`bottleneck` pass (`objective=latency`) times each candidate layer alone: a one-conv model of the
layer's real input shape against the same layer factorized (1x1 reduce -> kxk [-> 1x1 restore]),
A/B interleaved (`rewriter.bench.ab_latency`). Weights are random: time does not depend on values.
Results are cached per (shape, geometry, ranks, threads) for the life of a `ConvTimer`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from rewriter.bench import NO_SPINNING, ab_latency, batch_feeds
from rewriter.calibration import model_input_specs
from rewriter.graph import ConvGeometry
from rewriter.runtime import make_session

#: Measuring time per A/B comparison; the layer models are small, so this bounds the cost.
DEFAULT_MIN_TIME_S = 0.25


@dataclass(frozen=True)
class ConvLayer:
    """What a conv's run time depends on: input shape, output channels, geometry, bias, dtype."""

    in_shape: tuple[int, ...]
    out_channels: int
    geometry: ConvGeometry
    bias: bool = True
    dtype: str = "float32"


@dataclass(frozen=True)
class LayerTiming:
    """Medians of the original and factorized layer (ms) and the median per-pair speedup."""

    before_ms: float
    after_ms: float
    speedup: float

    @property
    def saved_ms(self) -> float:
        """Time saved, from the per-pair speedup (robust to drift): before·(1 - 1/speedup)."""
        return self.before_ms * (1.0 - 1.0 / self.speedup) if self.speedup > 0 else 0.0

    @property
    def saved_share(self) -> float:
        return 1.0 - 1.0 / self.speedup if self.speedup > 0 else 0.0

    def as_details(self) -> dict[str, float]:
        return {"layer_ms_before": round(self.before_ms, 4),
                "layer_ms_after": round(self.after_ms, 4),
                "layer_speedup": round(self.speedup, 4)}


#: (layer, rank, rank_out, threads) -> timing; injectable so tests can be deterministic.
TimeFn = Callable[[ConvLayer, int, "int | None", int], LayerTiming]


def conv_chain_model(layer: ConvLayer, rank: int | None, rank_out: int | None = None,
                     seed: int = 0) -> ir.Model:
    """One conv (`rank=None`) or its factorization: 1x1 to `rank` -> kxk (to `rank_out`
    with a 1x1 restore when given). The kxk keeps the original geometry and the bias goes
    last, as the pass builds it."""
    g = layer.geometry
    spatial = len(g.kernel)
    ones = [1] * spatial
    c, o = layer.in_shape[1], layer.out_channels
    np_dtype = np.dtype(layer.dtype)
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, shape: list[int]) -> str:
        fan_in = max(1, math.prod(shape[1:]))
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np_dtype), name))
        return name

    def conv(x: str, out: str, o_ch: int, c_ch: int, kxk: bool, bias: bool) -> str:
        inputs = [x, weight(f"{out}_W", [o_ch, c_ch, *(g.kernel if kxk else ones)])]
        if bias:
            inputs.append(weight(f"{out}_B", [o_ch]))
        attrs = g.attributes() if kxk else {"kernel_shape": ones, "strides": ones,
                                            "dilations": ones, "pads": [0] * (2 * spatial)}
        nodes.append(helper.make_node("Conv", inputs, [out], name=out, **attrs))
        return out

    if rank is None:
        conv("x", "y", o, c, True, layer.bias)
    elif rank_out is None:
        conv(conv("x", "z", rank, c, False, False), "y", o, rank, True, layer.bias)
    else:
        core = conv(conv("x", "z", rank, c, False, False), "core", rank_out, rank, True, False)
        conv(core, "y", o, rank_out, False, layer.bias)
    elem = helper.np_dtype_to_tensor_dtype(np_dtype)
    graph = helper.make_graph(
        nodes, "conv_timing", [helper.make_tensor_value_info("x", elem, list(layer.in_shape))],
        [helper.make_tensor_value_info("y", elem, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.serde.deserialize_model(proto)


def time_factorization(layer: ConvLayer, rank: int, rank_out: int | None = None,
                       threads: int = 1, min_time_s: float = DEFAULT_MIN_TIME_S) -> LayerTiming:
    """A/B interleaved onnxruntime timing of the layer vs its factorization at `rank`."""
    before = make_session(conv_chain_model(layer, None), threads=threads, config=NO_SPINNING)
    after = make_session(conv_chain_model(layer, rank, rank_out), threads=threads,
                         config=NO_SPINNING)
    x = np.random.default_rng(1).standard_normal(layer.in_shape).astype(layer.dtype)
    ab = ab_latency(before, after, {"x": x}, min_time_s=min_time_s, warmup=2,
                    label="conv timing")
    return LayerTiming(ab["a_ms"]["median"], ab["b_ms"]["median"], ab["speedup"]["median"])


def model_time_ms(model: ir.Model, input_shapes: Mapping[str, Sequence[int]] | None = None,
                  threads: int = 1, batch: int = 1,
                  min_time_s: float = DEFAULT_MIN_TIME_S) -> float:
    """Median onnxruntime time of one run of the whole model (the budget `target` shares)."""
    session = make_session(model, threads=threads, config=NO_SPINNING)
    feeds, _ = batch_feeds(model_input_specs(model), batch, input_shapes or {}, None)
    session.run(None, feeds)
    times = []
    while len(times) < 5 or (sum(times) < min_time_s and len(times) < 200):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


class ConvTimer:
    """Memoizes layer timings within one pass run (same-shaped layers are timed once)."""

    def __init__(self, threads: int = 1, min_time_s: float = DEFAULT_MIN_TIME_S,
                 time_fn: TimeFn | None = None) -> None:
        self.threads = threads
        self.min_time_s = min_time_s
        self._time_fn = time_fn
        self._cache: dict[tuple, LayerTiming] = {}
        self.measurements = 0

    def __call__(self, layer: ConvLayer, rank: int, rank_out: int | None = None) -> LayerTiming:
        key = (layer, rank, rank_out, self.threads)
        if key not in self._cache:
            self.measurements += 1
            if self._time_fn is not None:
                self._cache[key] = self._time_fn(layer, rank, rank_out, self.threads)
            else:
                self._cache[key] = time_factorization(layer, rank, rank_out, self.threads,
                                                      self.min_time_s)
        return self._cache[key]


__all__ = ["ConvLayer", "ConvTimer", "LayerTiming", "conv_chain_model", "model_time_ms",
           "time_factorization"]
