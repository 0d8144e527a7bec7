"""The part of a model one node feeds, runnable on the original's captured activations.

A single-layer sensitivity trial changes one conv: everything upstream of it computes what the
original computes. Cutting the model to the conv and its descendants, and feeding the values
they read from upstream (captured once from the original), runs a trial on a fraction of the
model's MACs: on a YOLOv8-layout detector a third on average over its candidate convs. Model
outputs the conv does not reach are the original's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from rewriter import runtime
from rewriter.cost import node_cost
from rewriter.graph import descendants, remove_unused

Outputs = Mapping[str, np.ndarray]
#: Held-out activations captured at once to feed several cuts (one run of the original).
FEED_BYTES = 1 << 30
#: Values fed from the capture must be batch-major data of these types; anything else (shapes,
#: sizes, scales, indices computed upstream) is recomputed inside the cut from its own inputs.
DATA_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16,
                        ir.DataType.DOUBLE})


@dataclass
class Downstream:
    """`model`: the conv and every node it feeds, with `boundary` (the values those nodes read
    from upstream) as graph inputs; `index`: the conv's position in `model`'s graph."""

    model: ir.Model
    index: int
    boundary: list[str]

    def feeds(self, original: ir.Model, inputs: Outputs) -> dict[str, np.ndarray] | None:
        """The boundary values on `inputs`: model inputs as given, the rest captured from the
        original (one run); None if one is not batch-major after all (then run whole)."""
        return next(feeds_in_chunks([self], original, inputs))

    def wanted(self, inputs: Outputs) -> list[str]:
        """The boundary values a capture of the original has to provide."""
        return [name for name in self.boundary if name not in inputs]

    def assemble(self, inputs: Outputs, captured: Mapping[str, np.ndarray]
                 ) -> dict[str, np.ndarray] | None:
        """The feeds from the given inputs and the captured values; None when a captured value
        is not one row per sample (a shape or a scalar computed upstream)."""
        samples = len(next(iter(inputs.values())))
        feeds = {name: inputs[name] for name in self.boundary if name in inputs}
        for name in self.wanted(inputs):
            value = captured[name]
            if np.ndim(value) == 0 or len(value) != samples:
                return None
            feeds[name] = value
        return feeds

    def outputs(self, model: ir.Model, feeds: Outputs, reference: Outputs) -> dict[str, np.ndarray]:
        """Every output of the full model: `model`'s (a rewritten copy of `self.model`), and the
        original's `reference` for those the conv does not reach."""
        return self.complete(runtime.run_all(model, feeds), reference)

    @staticmethod
    def complete(got: Outputs, reference: Outputs) -> dict[str, np.ndarray]:
        """Every output of the full model from a cut's run: the original's `reference` for
        those the conv does not reach."""
        return {name: got.get(name, reference[name]) for name in reference}


def feeds_in_chunks(cuts: Sequence[Downstream], original: ir.Model, inputs: Outputs,
                    budget: int = FEED_BYTES) -> Iterator[dict[str, np.ndarray] | None]:
    """Each cut's feeds (see `Downstream.assemble`), in order. Consecutive cuts share one run of
    the original while the values they capture fit `budget` bytes together (sizes from a
    one-sample probe): per-layer captures were a third of a sensitivity sweep's time."""
    names = sorted({name for cut in cuts for name in cut.wanted(inputs)})
    samples = len(next(iter(inputs.values())))
    per_sample: dict[str, int] = {}
    if names and len(cuts) > 1:  # sizes matter only where cuts could share a run
        probe = _captured(original, names, {k: v[:1] for k, v in inputs.items()})
        per_sample = {name: probe[name].nbytes for name in names}
    start = 0
    while start < len(cuts):
        stop, used, chunk_names = start, 0, set()
        while stop < len(cuts):
            new = set(cuts[stop].wanted(inputs)) - chunk_names
            need = samples * sum(per_sample.get(name, 0) for name in new)
            if stop > start and used + need > budget:
                break
            used += need
            chunk_names |= new
            stop += 1
        captured = _captured(original, sorted(chunk_names), inputs) if chunk_names else {}
        for cut in cuts[start:stop]:
            yield cut.assemble(inputs, captured)
        del captured  # before the next chunk's capture: at most one chunk held
        start = stop


def _captured(original: ir.Model, names: Sequence[str], inputs: Outputs
              ) -> dict[str, np.ndarray]:
    """The named values of the original over all of `inputs` (one run, batches joined)."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for batch in runtime.capture(original, list(names), inputs):
        for name in names:
            parts[name].append(batch[name])
    return {name: (arrays[0] if any(np.ndim(a) == 0 for a in arrays)
                   else np.concatenate(arrays, axis=0)) for name, arrays in parts.items()}


def cut_below(original: ir.Model, index: int) -> Downstream | None:
    """The conv at `index` and its descendants as a model of their own; None when the main graph
    holds subgraphs (their outer-scope reads are not followed here) or the cut saves nothing."""
    model = original.clone()
    graph = model.graph
    nodes = list(graph)
    if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
           for node in nodes for attr in node.attributes.values()):
        return None
    start = nodes[index]
    below: set[ir.Node] = set()
    stack = [start]
    while stack:
        node = stack.pop()
        if node in below:
            continue
        below.add(node)
        stack.extend(use.node for value in node.outputs for use in value.uses())
    data_inputs = [v for v in graph.inputs if v.name not in graph.initializers]
    if not data_inputs or data_inputs[0].shape is None or len(data_inputs[0].shape) == 0:
        return None
    _pull_shape_computations(below, graph, data_inputs[0].shape[0])
    if len(below) == len(nodes):
        return None
    boundary: dict[str, ir.Value] = {}
    for node in nodes:
        if node not in below:
            continue
        for i, value in enumerate(node.inputs):
            if value is None or value.name in graph.initializers or value.producer() in below:
                continue
            if value.name not in boundary:
                boundary[value.name] = ir.Value(name=value.name, shape=value.shape,
                                                type=value.type)
            node.replace_input_with(i, boundary[value.name])
    kept_outputs = [v for v in graph.outputs if v.producer() in below]
    graph.outputs.clear()
    graph.outputs.extend(kept_outputs)
    listed = [v for v in graph.inputs if v.name in graph.initializers]  # IR < 4 lists them
    graph.inputs.clear()
    graph.inputs.extend([*boundary.values(), *listed])
    remove_unused(model)  # the upstream nodes: nothing left reads them
    return Downstream(model, list(graph).index(start), list(boundary))


def cut_macs(model: ir.Model, indices: Sequence[int]) -> dict[int, int]:
    """Per node position: the MACs of that node and of everything downstream of it (what a
    single-layer trial on its cut runs per sample)."""
    nodes = list(model.graph)
    macs = [node_cost(n).macs or 0 for n in nodes]
    return {i: macs[i] + sum(macs[j] for j in descendants(model, i)) for i in indices}


def _pull_shape_computations(below: set[ir.Node], graph: ir.Graph, batch: object) -> None:
    """Add to `below` the upstream producers of every value it reads that is not batch-major
    data (a Resize's scales, a batch size taken by Shape from another branch, a Constant), until
    all it reads from upstream is data with `batch` as its leading dim."""
    changed = True
    while changed:
        changed = False
        for node in list(below):
            for value in node.inputs:
                if value is None or value.name in graph.initializers:
                    continue
                producer = value.producer()
                if producer is not None and producer not in below and not _batch_data(
                        value, batch):
                    below.add(producer)
                    changed = True


def _batch_data(value: ir.Value, batch: object) -> bool:
    """Data whose leading dim is (or may be: shape inference left it symbolic) the batch; the
    capture checks the real length (`Downstream.feeds`)."""
    shape = value.shape
    return (value.dtype in DATA_TYPES and shape is not None and len(shape) > 0
            and (shape[0] == batch or not isinstance(shape[0], int)))
