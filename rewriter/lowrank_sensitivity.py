"""Measured sensitivity: the model's error on held-out data with only some layers rewritten.

`model_error` is the one lower-is-better number these measurements read: the task-aware
`rewriter.fidelity.task_error` (worst output group) when the project has it, else the worst
output's relative L2. Each single-layer measurement is cached per (model, held-out data, layer,
rank, init), so `target=auto`, allocation and the report never measure the same trial twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from rewriter import runtime
from rewriter.downstream import Downstream, cut_below, feeds_in_chunks
from rewriter.fidelity import compare_arrays
from rewriter.graph import Namer
from rewriter.lowrank_methods import Factorization, Rank
from rewriter.lowrank_select import ConvLayer

Outputs = Mapping[str, np.ndarray]
#: (model, node, layer, factors) -> graph surgery on `model` (see `rewriter.lowrank_emit`).
EmitFn = Callable[[ir.Model, ir.Node, ConvLayer, Factorization, Namer], object]

_CACHE: dict[tuple, float] = {}
#: Errors not measured: a larger rank of a method whose most-saving rank was negligible.
_BOUNDS: dict[tuple, float] = {}
#: Held-out MACs one sensitivity sweep may run (about a minute of onnxruntime on 2 cores): a
#: bigger sweep measures on an evenly spread subset of the held-out samples, never fewer than
#: the floor; whole-model checks (back-off, gates, target=auto) still see every sample.
SWEEP_MACS = 2e12


def sweep_samples(held_out: int, macs_per_sample: float, floor: int,
                  requested: int | None = None) -> int:
    """How many held-out samples a sweep of `macs_per_sample` (trials x the MACs each runs)
    measures on: `requested`, else all that fit `SWEEP_MACS`, at least `floor`."""
    if requested is not None:
        return max(1, min(held_out, requested))
    if macs_per_sample * held_out <= SWEEP_MACS:
        return held_out
    return max(1, min(held_out, max(floor, int(SWEEP_MACS // macs_per_sample))))


def spread(n: int, k: int) -> np.ndarray:
    """`k` of `n` sample positions evenly spread (data sorted by class keeps every class)."""
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def sweep_subset(inputs: Outputs, reference: Outputs, k: int
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The held-out inputs and the original's outputs on `k` spread samples."""
    n = len(next(iter(inputs.values())))
    index = spread(n, k)

    def take(arrays: Outputs) -> dict[str, np.ndarray]:
        return {name: a[index] if np.ndim(a) and len(a) == n else a for name, a in arrays.items()}

    return take(inputs), take(reference)


def model_error(reference: Outputs, candidate: Outputs) -> float:
    """Task error of `candidate` against `reference` (lower is better, 0 identical)."""
    try:
        from rewriter.fidelity import task_error  # the task-aware metric, where present
    except ImportError:
        task_error = None
    if task_error is not None:
        return float(task_error(reference, candidate))
    return max(compare_arrays(reference[k], candidate[k])["rel_l2"] for k in reference)


def fingerprint(model: ir.Model, inputs: Mapping[str, np.ndarray]) -> str:
    """Identity of a model and a data set for the cache (graph, weights and samples)."""
    digest = hashlib.sha1(ir.serde.serialize_model(model).SerializeToString())
    for name in sorted(inputs):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(inputs[name]).tobytes())
    return digest.hexdigest()


def rewritten_outputs(original: ir.Model, rewrites: Sequence[tuple[ConvLayer, Factorization]],
                      inputs: Mapping[str, np.ndarray], emit: EmitFn) -> dict[str, np.ndarray]:
    """Outputs of a copy of `original` with the given layers replaced by the given factors."""
    trial = original.clone()
    nodes, namer = list(trial.graph), Namer(trial)
    for layer, factors in rewrites:
        emit(trial, nodes[layer.index], layer, factors, namer)
    return runtime.run_all(trial, inputs)


def single_layer_errors(original: ir.Model, layers: Sequence[ConvLayer],
                        grid: Mapping[int, Sequence[Rank]],
                        factors: Callable[[ConvLayer, Rank], Factorization],
                        inputs: Mapping[str, np.ndarray], reference: Outputs, emit: EmitFn,
                        init: str, metric: Callable[[Outputs, Outputs], float] = model_error,
                        metric_key: str = "", log: Callable[[str], None] = lambda m: None,
                        negligible: float = 0.0) -> dict[tuple[int, Rank], float]:
    """Per (layer index, rank): the model error with only that layer rewritten (cached;
    `metric_key` names what the metric depends on besides its code, e.g. the output groups).

    Each method's most-saving rank is measured first; where its error is below `negligible`,
    that error stands for the method's larger ranks too (they keep more of the layer, so cost no
    more; a third of a detector's trials were below 1e-4) and they are not run."""
    model_key = fingerprint(original, inputs)
    keys = {(layer.index, rank): (model_key, layer.index, layer.name, rank, init,
                                  metric.__qualname__, metric_key)
            for layer in layers for rank in grid.get(layer.index, ())}

    def known(key: tuple) -> bool:
        return key in _CACHE or _BOUNDS.get(key, np.inf) < negligible

    todo = [layer for layer in layers
            if not all(known(keys[(layer.index, rank)]) for rank in grid.get(layer.index, ()))]
    for layer, trial in zip(todo, _layer_trials(original, todo, inputs, reference, emit),
                            strict=True):
        for ranks in _by_method(grid.get(layer.index, ())):
            cheapest, *rest = ranks
            for rank in (cheapest, *rest):
                key = keys[(layer.index, rank)]
                if rank is not cheapest and _CACHE[keys[(layer.index, cheapest)]] < negligible:
                    _BOUNDS[key] = _CACHE[keys[(layer.index, cheapest)]]
                elif key not in _CACHE:
                    _CACHE[key] = metric(reference, trial(factors(layer, rank)))
                    log(f"sensitivity: {layer.name} {rank} -> {_CACHE[key]:.4g}")
    return {pair: _CACHE[key] if key in _CACHE else _BOUNDS[key] for pair, key in keys.items()}


def _by_method(ranks: Sequence[Rank]) -> list[list[Rank]]:
    """A layer's grid per method, most-saving rank first (grids list ranks largest first)."""
    methods: dict[str, list[Rank]] = {}
    for rank in ranks:
        methods.setdefault(rank.method, []).append(rank)
    return [list(reversed(group)) for group in methods.values()]


Trial = Callable[[Factorization], Outputs]


def _layer_trials(original: ir.Model, layers: Sequence[ConvLayer],
                  inputs: Mapping[str, np.ndarray], reference: Outputs, emit: EmitFn
                  ) -> Iterator[Trial]:
    """Per layer, in order: factors -> the model's outputs with only that layer replaced, run
    from that layer down on the original's captured activations (`rewriter.downstream`; one
    capture run feeds several layers), or whole where the model cannot be cut."""
    cuts = {layer.index: cut_below(original, layer.index) for layer in layers}
    usable = [cut for cut in cuts.values() if cut is not None]
    feeds = feeds_in_chunks(usable, original, inputs)
    for layer in layers:
        cut = cuts[layer.index]
        fed = next(feeds) if cut is not None else None
        if cut is None or not fed:
            yield lambda f, layer=layer: rewritten_outputs(original, [(layer, f)], inputs, emit)
            continue

        yield SharedTrial(cut, fed, reference, layer, emit)


class SharedTrial:
    """A layer's trials on one onnxruntime session: the cut with the layer's factors emitted,
    their weights as graph inputs of free shape, fed with every run. Ranks of one method emit
    the same graph, so a layer's grid opens a session per method, not per rank (opening one
    was a third of a trial on a 1 G-MAC detector); another structure opens a new one."""

    def __init__(self, cut: Downstream, fed: Outputs, reference: Outputs, layer: ConvLayer,
                 emit: EmitFn) -> None:
        self.cut, self.fed, self.reference, self.layer, self.emit = (cut, fed, reference,
                                                                     layer, emit)
        self.session = None
        self.structure: tuple | None = None

    def __call__(self, factors: Factorization) -> Outputs:
        trial = self.cut.model.clone()
        kept = set(trial.graph.initializers)
        self.emit(trial, list(trial.graph)[self.cut.index], self.layer, factors, Namer(trial))
        weights = {name: value for name, value in trial.graph.initializers.items()
                   if name not in kept}
        arrays = {name: value.const_value.numpy() for name, value in weights.items()}
        structure = _structure(trial)
        if structure != self.structure:
            self.session = runtime.make_session(_weights_as_inputs(trial, weights))
            self.structure = structure
        got = runtime.run_session_all(self.session, self.fed, constants=arrays)
        return self.cut.complete(got, self.reference)


def _structure(model: ir.Model) -> tuple:
    """What a session depends on besides the new weights' values: ops, wiring, attributes."""
    return tuple((node.op_type, node.domain, tuple(v.name if v else "" for v in node.inputs),
                  tuple(v.name for v in node.outputs),
                  tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items())))
                 for node in model.graph)


def _weights_as_inputs(model: ir.Model, weights: Mapping[str, ir.Value]) -> ir.Model:
    """`model` with the named initializers turned into graph inputs of free shape."""
    graph = model.graph
    for name, value in weights.items():
        graph.initializers.pop(name)
        rank = len(value.shape) if value.shape is not None else 0
        value.const_value = None
        value.shape = ir.Shape([f"{name}_dim{i}" for i in range(rank)])
        graph.inputs.append(value)
    return model


def clear_cache() -> None:
    _CACHE.clear()
    _BOUNDS.clear()
