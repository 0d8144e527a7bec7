"""The model being rewritten, run forward on the fit data one refit group at a time.

Refit fits each layer on the activations the *rewritten* model feeds it, so every group reads
values the groups before it changed, and the model was run from its inputs once per group: the
prefix again and again (26 runs of up to the whole model on a 1.17 G-MAC detector, most of
a 44 s refit; 14 s now). Here each run also returns the values that nodes not run yet will read (the
frontier: the requested inputs, skip connections, features a neck reads later), and holds them
while they fit the budget; the next group's run starts from them, so each node runs about once.
A held value whose producer has changed since (a merge rewrote the 1x1 conv producing it) is
dropped and recomputed from further up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from rewriter import runtime
from rewriter.downstream import DATA_TYPES, FEED_BYTES
from rewriter.graph import remove_unused


class ForwardValues:
    """Named values of `model` (rewritten in place between calls) over all of `inputs`."""

    def __init__(self, model: ir.Model, inputs: Mapping[str, np.ndarray], batch_size: int = 32,
                 budget: int = FEED_BYTES, label: str | None = None) -> None:
        self.model, self.inputs, self.batch_size, self.budget, self.label = (
            model, inputs, batch_size, budget, label)
        self.samples = len(next(iter(inputs.values())))
        #: name -> (values over all samples, its producer, the producer's inputs then)
        self._held: dict[str, tuple[np.ndarray, ir.Node, tuple]] = {}
        self.holds = not any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                             for node in model.graph for attr in node.attributes.values())
        self.runs = 0

    def values(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The named values now, from the held frontier where it reaches them."""
        by_name = {v.name: v for node in self.model.graph for v in node.outputs}
        self._drop_stale(by_name)
        out = {name: self.inputs[name] for name in names if name in self.inputs}
        out.update({name: self._held[name][0] for name in names if name in self._held})
        wanted = [name for name in dict.fromkeys(names) if name not in out]
        if not wanted:
            return out
        region = self._region([by_name[name] for name in wanted])
        later = self._frontier(region, by_name) if self.holds else []
        still = {name: self._held[name][0] for name in later if name in self._held}
        room = self.budget - sum(a.nbytes for a in still.values())
        arrays = self._run(wanted, [n for n in later if n not in self._held and n not in wanted],
                           region, room)
        self.runs += 1
        out.update({name: arrays[name] for name in wanted})
        room -= sum(arrays[name].nbytes for name in arrays if name not in wanted)
        for name in wanted:  # returned anyway; held on only within the budget
            if name in later and arrays[name].nbytes <= room:
                room -= arrays[name].nbytes
            else:
                arrays.pop(name)
        self._hold({**still, **arrays}, [n for n in later if n in still or n in arrays],
                   by_name)
        return out

    def _drop_stale(self, by_name: Mapping[str, ir.Value]) -> None:
        for name, (_, producer, inputs) in list(self._held.items()):
            value = by_name.get(name)
            if value is None or value.producer() is not producer or tuple(
                    producer.inputs) != inputs:
                del self._held[name]

    def _region(self, values: Sequence[ir.Value]) -> set[ir.Node]:
        """The nodes that compute `values` from the held ones and the graph's inputs."""
        region: set[ir.Node] = set()
        stack = [v.producer() for v in values]
        while stack:
            node = stack.pop()
            if node is None or node in region:
                continue
            region.add(node)
            stack.extend(v.producer() for v in node.inputs
                         if v is not None and v.name not in self._held)
        return region

    def _frontier(self, region: set[ir.Node], by_name: Mapping[str, ir.Value]) -> list[str]:
        """Values this run makes available (or that are held) that a node not run yet reads."""
        available = set(self._held) | {v.name for node in region for v in node.outputs}
        later: list[str] = []
        for name in sorted(available):
            value = by_name.get(name)
            if value is None or (value.dtype is not None and value.dtype not in DATA_TYPES):
                continue
            if any(use.node not in region and not all(o.name in available
                                                      for o in use.node.outputs)
                   for use in value.uses()):
                later.append(name)
        return later

    def _run(self, wanted: Sequence[str], extra: Sequence[str], region: set[ir.Node],
             room: int) -> dict[str, np.ndarray]:
        """One run of the region (held values enter as graph inputs): the wanted values, and
        those of `extra` that fit `room` bytes over all samples (sizes from the first batch;
        values that are not one row per sample are not kept)."""
        clone = self.model.clone()
        graph = clone.graph
        values = {v.name: v for node in graph for v in node.outputs}
        fed: dict[str, np.ndarray] = dict(self.inputs)
        read = {v.name for node in region for v in node.inputs if v is not None}
        for name in [name for name in self._held if name in read and name in values]:
            old = values[name]
            new = ir.Value(name=name, shape=old.shape, type=old.type)
            for use in list(old.uses()):
                use.node.replace_input_with(use.idx, new)
            graph.inputs.append(new)
            fed[name] = self._held[name][0]
        fetched = [*wanted, *extra]
        graph.outputs.clear()
        graph.outputs.extend(values[name] for name in fetched)
        remove_unused(clone)
        session = runtime.make_session(clone, optimize=False)
        parts: dict[str, list[np.ndarray]] = {}
        kept: list[str] = list(wanted)
        for batch in runtime.run_batched(session, fed, fetched, self.batch_size, self.label):
            if not parts:
                kept.extend(self._fitting(batch, extra, room))
            for name in kept:
                parts.setdefault(name, []).append(batch[name])
        return {name: np.concatenate(arrays) if np.ndim(arrays[0]) else arrays[-1]
                for name, arrays in parts.items()}

    def _fitting(self, batch: Mapping[str, np.ndarray], extra: Sequence[str],
                 room: int) -> list[str]:
        """The extra values of one row per sample that fit `room` over all samples."""
        rows = len(next(iter(batch.values())))
        kept, used = [], 0
        for name in extra:
            array = batch[name]
            if not _per_sample_data(array, rows):
                continue
            need = array.nbytes // rows * self.samples
            if used + need <= room:
                kept.append(name)
                used += need
        return kept

    def _hold(self, arrays: Mapping[str, np.ndarray], frontier: Sequence[str],
              by_name: Mapping[str, ir.Value]) -> None:
        held = {}
        for name in frontier:
            array = arrays.get(name)
            if array is None or not _per_sample_data(array, self.samples):
                continue  # not one float row per sample (a shape, a scalar): recomputed
            producer = by_name[name].producer()
            held[name] = (array, producer, tuple(producer.inputs))
        self._held = held


def _per_sample_data(array: np.ndarray, rows: int) -> bool:
    """Float data with one row per sample: what may be held and fed back in slices (a shape
    or an index tensor, whatever its length, is recomputed from its own inputs instead)."""
    return (rows > 0 and np.ndim(array) > 0 and len(array) == rows
            and np.issubdtype(np.asarray(array).dtype, np.floating))
