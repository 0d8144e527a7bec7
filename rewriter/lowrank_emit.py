"""Graph surgery for low-rank factors: replace one Conv node by the convs its factors describe.

`Factors` become a 1x1 reduce (or a merge into a preceding linear 1x1 conv) then the kxk conv,
which keeps the original strides, pads, auto_pad and dilations; `Tucker2` adds a core and a 1x1
restore; `SpatialFactors` become a kx1 conv then a 1xk conv with the geometry split between them.
Weights are cast to the model's dtype here; every new value goes through `rewriter.graph`.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from rewriter import lowrank, spatial_lowrank
from rewriter.graph import Namer, make_node, new_initializer, pointwise_conv_attrs, replace_value
from rewriter.lowrank_methods import Factorization
from rewriter.lowrank_select import ConvLayer
from rewriter.pointwise import compose, linear_pointwise_producer


@dataclass
class Emitted:
    """What replaced a layer: the value now carrying its output, and a merge when one happened."""

    output: ir.Value
    merged_into: str | None = None
    producer_macs_delta: int = 0  # MACs the merged producer gained (negative: it shrank)
    merged_value: ir.Value | None = None  # the producer's output, now the reduced features


def emit(model: ir.Model, node: ir.Node, layer: ConvLayer, factors: Factorization,
         namer: Namer, merge: bool = True) -> Emitted:
    """Replace `node` (the layer's conv in `model`) by the factorized convs."""
    if isinstance(factors, spatial_lowrank.SpatialFactors):
        return _emit_spatial(model, node, layer, factors, namer)
    graph = model.graph
    spatial = len(layer.geometry.kernel)
    base = node.name or f"conv{layer.index}"
    ones = [1] * spatial
    x = node.inputs[0]
    producer = linear_pointwise_producer(x) if merge else None
    emitted = Emitted(output=x)
    rank = factors.reduce.shape[0]
    if producer is not None:
        w, b = compose(producer, factors.reduce)
        pnode = producer.node
        pname = pnode.name or "pointwise"
        new_w = new_initializer(graph, namer(f"{pname}_W"),
                                w.reshape(*w.shape, *ones).astype(layer.dtype))
        new_b = new_initializer(graph, namer(f"{pname}_B"), b.astype(layer.dtype))
        pnode.replace_input_with(1, new_w)
        if len(pnode.inputs) < 3:
            pnode.resize_inputs(3)
        pnode.replace_input_with(2, new_b)
        x.shape = None
        z = x
        emitted.merged_into, emitted.merged_value = pname, x
        emitted.producer_macs_delta = (layer.in_positions * producer.weight.shape[1]
                                       * (rank - layer.channels))
    else:
        p = new_initializer(graph, namer(f"{base}_reduce_W"),
                            factors.reduce.reshape(rank, layer.channels, *ones)
                            .astype(layer.dtype))
        reduce = make_node("Conv", [x, p], pointwise_conv_attrs(spatial),
                           name=namer(f"{base}_reduce"), namer=namer)
        graph.insert_before(node, reduce)
        z = reduce.outputs[0]
    attrs = layer.geometry.attributes()
    if isinstance(factors, lowrank.Tucker2):
        core_w = new_initializer(graph, namer(f"{base}_core_W"), factors.core.astype(layer.dtype))
        core = make_node("Conv", [z, core_w], attrs, name=namer(f"{base}_core"), namer=namer)
        graph.insert_before(node, core)
        restore_w = new_initializer(
            graph, namer(f"{base}_restore_W"),
            factors.restore.reshape(*factors.restore.shape, *ones).astype(layer.dtype))
        last = _conv(graph, namer, f"{base}_restore", [core.outputs[0], restore_w], factors.bias,
                     pointwise_conv_attrs(spatial), layer)
    else:
        w2 = new_initializer(graph, namer(f"{base}_W"), factors.kernel.astype(layer.dtype))
        role = "expand" if layer.geometry.is_pointwise else "kxk"
        last = _conv(graph, namer, f"{base}_{role}", [z, w2], factors.bias, attrs, layer)
    return _replace(graph, node, last, emitted)


def _emit_spatial(model: ir.Model, node: ir.Node, layer: ConvLayer,
                  factors: spatial_lowrank.SpatialFactors, namer: Namer) -> Emitted:
    graph = model.graph
    base = node.name or f"conv{layer.index}"
    vertical, horizontal = spatial_lowrank.split_windows(layer.window, layer.in_shape[2:],
                                                         layer.out_shape[2:])
    v_w = new_initializer(graph, namer(f"{base}_kx1_W"), factors.vertical.astype(layer.dtype))
    first = make_node("Conv", [node.inputs[0], v_w], _attrs(vertical),
                      name=namer(f"{base}_kx1"), namer=namer)
    graph.insert_before(node, first)
    h_w = new_initializer(graph, namer(f"{base}_1xk_W"), factors.horizontal.astype(layer.dtype))
    last = _conv(graph, namer, f"{base}_1xk", [first.outputs[0], h_w], factors.bias,
                 _attrs(horizontal), layer)
    return _replace(graph, node, last, Emitted(output=node.outputs[0]))


def _attrs(window: lowrank.Window) -> dict:
    return {"kernel_shape": list(window.kernel), "strides": list(window.strides),
            "dilations": list(window.dilations), "pads": list(window.pads), "group": 1}


def _conv(graph: ir.Graph, namer: Namer, name: str, inputs: list, bias, attrs: dict,
          layer: ConvLayer) -> ir.Node:
    if bias is not None:
        inputs = [*inputs, new_initializer(graph, namer(f"{name}_B"), bias.astype(layer.dtype))]
    return make_node("Conv", inputs, attrs, name=namer(name), namer=namer)


def _replace(graph: ir.Graph, node: ir.Node, last: ir.Node, emitted: Emitted) -> Emitted:
    graph.insert_before(node, last)
    replace_value(node.outputs[0], last.outputs[0])
    graph.remove(node, safe=True)
    emitted.output = last.outputs[0]
    return emitted
