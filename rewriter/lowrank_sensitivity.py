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
                        metric_key: str = "", log: Callable[[str], None] = lambda m: None
                        ) -> dict[tuple[int, Rank], float]:
    """Per (layer index, rank): the model error with only that layer rewritten (cached;
    `metric_key` names what the metric depends on besides its code, e.g. the output groups)."""
    model_key = fingerprint(original, inputs)
    keys = {(layer.index, rank): (model_key, layer.index, layer.name, rank, init,
                                  metric.__qualname__, metric_key)
            for layer in layers for rank in grid.get(layer.index, ())}
    todo = [layer for layer in layers
            if any(keys[(layer.index, rank)] not in _CACHE for rank in grid.get(layer.index, ()))]
    for layer, trial in zip(todo, _layer_trials(original, todo, inputs, reference, emit),
                            strict=True):
        for rank in grid.get(layer.index, ()):
            key = keys[(layer.index, rank)]
            if key not in _CACHE:
                _CACHE[key] = metric(reference, trial(factors(layer, rank)))
                log(f"sensitivity: {layer.name} {rank} -> {_CACHE[key]:.4g}")
    return {pair: _CACHE[key] for pair, key in keys.items()}


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

        def downstream(f: Factorization, cut: Downstream = cut, fed: Outputs = fed,
                       layer: ConvLayer = layer) -> Outputs:
            trial = cut.model.clone()
            emit(trial, list(trial.graph)[cut.index], layer, f, Namer(trial))
            return cut.outputs(trial, fed, reference)

        yield downstream


def clear_cache() -> None:
    _CACHE.clear()
