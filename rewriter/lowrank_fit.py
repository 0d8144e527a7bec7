"""Fitting low-rank factors: input statistics for the spectra, and layer-wise refit.

Spectra come from one capture run of the original model (every method's input statistic fed
from the same batches). Refit (`init=refit`) rewrites layers in topological order: the original
layers' outputs are sampled once per chunk (bounded memory), then each group of layers none of
which feeds another is refit on activations of the already rewritten model, one onnxruntime
session per group (the reduce alternations reuse it), and emitted before the next group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir

from rewriter import lowrank, runtime, spatial_lowrank
from rewriter.activations import following_activation
from rewriter.context import PassContext
from rewriter.downstream import FEED_BYTES
from rewriter.forward import ForwardValues
from rewriter.graph import descendants
from rewriter.lowrank_methods import Factorization, Method, Rank, method_named, spectrum_key
from rewriter.lowrank_select import ConvLayer
from rewriter.progress import Counter

#: Memory for the original model's sampled layer outputs held at once during refit.
TARGET_BYTES = 512 * 2**20
#: Refitting the 1x1 too assembles (r·C)² normal equations from (C·K)² moments: only for
#: layers where that costs at most this many multiply-adds.
REDUCE_REFIT_LIMIT = 4e9
#: Sampled output rows per layer a post-activation scale/shift is fitted on.
POST_ACT_ROWS = 8192

Spectra = dict[tuple[int, str], lowrank.Spectrum]


@dataclass(frozen=True)
class FitSettings:
    shrink: float = lowrank.DEFAULT_SHRINK
    ridge: float = lowrank.DEFAULT_RIDGE
    max_positions: int = 4096
    refit_reduce: int = 1
    post_activation: bool = True  # refit: match the original after a lone SiLU/ReLU
    #: per layer index, what its fit used and did (positions, post-activation errors)
    details: dict[int, dict] = field(default_factory=dict)


def spectra(original: ir.Model, layers: Sequence[ConvLayer], methods: Sequence[Method],
            init: str, context: PassContext, settings: FitSettings) -> Spectra:
    """Per (layer index, spectrum kind): svd without data, else whitened by the layer input."""
    # per (layer, spectrum kind) one method that applies (`in` and `in-out` share a spectrum)
    usable = {(layer.index, spectrum_key(m.name)): (layer, m) for layer in layers
              for m in methods if m.refusal(layer) is None}
    if init == "svd":
        return {key: m.spectrum(layer, None, settings.shrink)
                for key, (layer, m) in usable.items()}
    context.log(f"low-rank: input statistics of {len(layers)} convs")
    stats = {key: m.statistic(layer, settings.max_positions, context.seed)
             for key, (layer, m) in usable.items()}
    names = sorted({layer.input_name for layer in layers})
    for batch in context.capture(original, names, "fit"):
        for key, stat in stats.items():
            stat.add(batch[usable[key][0].input_name])
    out = {key: m.spectrum(layer, stats[key].value(), settings.shrink)
           for key, (layer, m) in usable.items()}
    for key, stat in stats.items():  # the channel mean serves bias correction
        if isinstance(stat, lowrank.SecondMoment) and out[key].moment is not None:
            out[key] = replace(out[key], mean=stat.mean())
    return out


def start_factors(layer: ConvLayer, spectra: Spectra, rank: Rank) -> Factorization:
    """Factors from the spectrum (svd or whitened init)."""
    method = method_named(rank.method)
    return method.factors(layer, spectra[(layer.index, spectrum_key(rank))], rank)


EmitFn = Callable[[ConvLayer, Factorization], object]


def fit_and_emit(model: ir.Model, original: ir.Model, layers: Sequence[ConvLayer],
                 ranks: Mapping[int, Rank], spectra: Spectra, init: str, context: PassContext,
                 settings: FitSettings, emit: EmitFn) -> dict[int, object]:
    """Factor every planned layer and hand it to `emit` in topological order; returns what
    `emit` returned per layer index. `model` is rewritten in place, `original` only read."""
    chosen = [layer for layer in layers if layer.index in ranks]
    if init != "refit":
        return {layer.index: emit(layer, start_factors(layer, spectra, ranks[layer.index]))
                for layer in chosen}
    nodes = list(model.graph)
    outputs = {id(v) for v in model.graph.outputs}
    emitted: dict[int, object] = {}
    layers_done = Counter(len(chosen), "refit layer")
    forward = ForwardValues(model, context.fit.inputs, context.batch_size,
                            label="calibration (fit)")
    for chunk in target_chunks(chosen, context, settings.max_positions):
        targets = capture_targets(original, chunk, context, settings.max_positions)
        by_index = {layer.index: layer for layer in chunk}
        for group in independent_groups(original, list(by_index)):
            members = [by_index[i] for i in group]
            context.log(f"low-rank: refit {', '.join(m.name for m in members)}")
            x_names = {m.index: nodes[m.index].inputs[0].name for m in members}
            acts = {m.index: following_activation(nodes[m.index].outputs[0], outputs)
                    for m in members} if settings.post_activation else {}
            fitted = refit_group(model, members, x_names, ranks, spectra, targets, context,
                                 settings, acts, forward)
            for m in members:
                emitted[m.index] = emit(m, fitted[m.index])
                del targets[m.index]
            layers_done.advance(len(members))
    layers_done.close()
    return emitted


def refit_group(model: ir.Model, members: Sequence[ConvLayer], x_names: Mapping[int, str],
                ranks: Mapping[int, Rank], spectra: Spectra,
                targets: dict[int, lowrank.SampledTargets], context: PassContext,
                settings: FitSettings, activations: Mapping[int, str | None] | None = None,
                forward: ForwardValues | None = None) -> dict[int, Factorization]:
    """Least squares for each member's last conv on the rewritten model's activations (one
    run serves the first solve and the reduce alternations; `forward` carries what one
    group's run computed on to the next)."""
    direct = {m.index for m in members if _fits_directly(m, ranks[m.index])}
    small = [m for m in members if ranks[m.index].method != "spatial"
             and m.index not in direct
             and reduce_refit_cost(m, ranks[m.index].r) <= REDUCE_REFIT_LIMIT]
    names = sorted(set(x_names.values()))
    # The members' inputs do not change while their own factors are refit: where they fit the
    # budget they come from the forward run (held, one run serves the first solve and every
    # reduce alternation), else they stream from a run of the prefix per pass over the data.
    per_sample = sum(math.prod(m.in_shape[1:]) * m.dtype.itemsize
                     for m in {x_names[m.index]: m for m in members}.values())
    if forward is not None and context.fit.n * per_sample <= FEED_BYTES:
        full = forward.values(names)
        bounds = np.cumsum([0, *targets[members[0].index].sizes])
        kept = [{name: full[name][a:b] for name in names}
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

        def rewritten_inputs():
            return kept
    else:
        session = runtime.make_session(runtime.only_outputs(model, names), optimize=False)

        def rewritten_inputs():
            return runtime.run_batched(session, context.fit.inputs, names, context.batch_size,
                                       "calibration (fit)")

    def feed(group: Sequence[ConvLayer], accs: Mapping[int, object]) -> None:
        for b, x_batch in enumerate(rewritten_inputs()):
            for m in group:
                positions, rows = targets[m.index].batches[b]
                accs[m.index].add_rows(x_batch[x_names[m.index]], targets[m.index].out_dims,
                                       positions, rows)

    activations = activations or {}
    by_index = {m.index: m for m in members}
    keep = {m.index: POST_ACT_ROWS if activations.get(m.index)
            and ranks[m.index].method != "spatial" else 0 for m in members}
    accs = {m.index: _refit_accumulator(m, start_factors(m, spectra, ranks[m.index]),
                                        keep[m.index], m.index in direct)
            for m in members}
    feed(members, accs)
    factors = {i: lowrank.reduced_rank_fit(acc.equations, ranks[i].r, by_index[i].geometry.kernel,
                                           settings.ridge) if i in direct
               else acc.solve(settings.ridge) for i, acc in accs.items()}
    for _ in range(settings.refit_reduce if small else 0):
        reducers = {m.index: lowrank.ReduceRefitAccumulator(
            factors[m.index].kernel, factors[m.index].bias, m.window, m.channels)
            for m in small}
        feed(small, reducers)
        refits = {}
        for m in small:
            p, _ = lowrank.balance(reducers[m.index].solve(settings.ridge),
                                   np.zeros((ranks[m.index].r, 1)))
            refits[m.index] = lowrank.RefitAccumulator(p, m.out_channels, m.window,
                                                       keep_rows=keep[m.index])
        feed(small, refits)
        for m in small:
            accs[m.index] = refits[m.index]
            factors[m.index] = refits[m.index].solve(settings.ridge)
    out: dict[int, Factorization] = {}
    for m in members:
        r_out = ranks[m.index].r_out
        if r_out is None:
            out[m.index] = factors[m.index]
        else:
            moment = accs[m.index].equations.input_moment()
            out[m.index] = lowrank.restore_outputs(factors[m.index], r_out, moment)
        details = settings.details.setdefault(m.index, {})
        details.update(fit_samples=context.fit.n, fit_positions=accs[m.index].equations.rows)
        if keep[m.index]:
            patches, rows = accs[m.index].kept_rows()
            if m.index in direct:  # kept as the layer's input: reduce them as the fit does
                patches = patches @ out[m.index].reduce.T
            fit, before, after = lowrank.post_activation_fit(out[m.index], patches, rows,
                                                             activations[m.index])
            out[m.index] = fit
            details.update(activation=activations[m.index], post_act_rel_error_before=before,
                           post_act_rel_error_after=after)
    return out


def _fits_directly(layer: ConvLayer, rank: Rank) -> bool:
    """A 1x1 factored `in`: both factors come from one reduced-rank regression on the full
    input (C features), where alternating would assemble an (r·C)² system."""
    return layer.geometry.is_pointwise and rank.method == "in"


def _refit_accumulator(layer: ConvLayer, start: Factorization, keep_rows: int = 0,
                       full_input: bool = False):
    if isinstance(start, spatial_lowrank.SpatialFactors):
        return spatial_lowrank.SpatialRefit(start.vertical, layer.out_channels, layer.window)
    reduce = np.eye(layer.channels) if full_input else start.reduce
    return lowrank.RefitAccumulator(reduce, layer.out_channels, layer.window,
                                    keep_rows=keep_rows)


def reduce_refit_cost(layer: ConvLayer, rank: int) -> float:
    k = math.prod(layer.geometry.kernel)
    return float(rank * layer.channels) ** 2 * k * k


def target_chunks(chosen: Sequence[ConvLayer], context: PassContext,
                  max_positions: int | None) -> list[list[ConvLayer]]:
    """Consecutive layers whose sampled original outputs fit the memory budget together."""
    batch = context.batch_size
    n_batches = -(-context.fit.n // batch)
    chunks: list[list[ConvLayer]] = []
    used = TARGET_BYTES
    for layer in chosen:
        need = lowrank.SampledTargets.nbytes_estimate(n_batches, batch, layer.out_shape[1:],
                                                      max_positions)
        if used + need > TARGET_BYTES and (not chunks or chunks[-1]):
            chunks.append([])
            used = 0
        chunks[-1].append(layer)
        used += need
    return chunks


def capture_targets(original: ir.Model, chunk: Sequence[ConvLayer], context: PassContext,
                    max_positions: int | None) -> dict[int, lowrank.SampledTargets]:
    """One run of the original model: each layer's output y at sampled positions."""
    targets = {c.index: lowrank.SampledTargets() for c in chunk}
    rngs = {c.index: np.random.default_rng([context.seed, c.index]) for c in chunk}
    names = sorted({c.output_name for c in chunk})
    for batch in context.capture(original, names):
        for c in chunk:
            targets[c.index].add(batch[c.output_name], max_positions, rngs[c.index])
    return targets


def independent_groups(model: ir.Model, indices: list[int]) -> list[list[int]]:
    """Consecutive layers (topological order) none of which feeds another: one capture run
    serves them all."""
    groups: list[list[int]] = []
    downstream: set[int] = set()
    for i in sorted(indices):
        if groups and i not in downstream:
            groups[-1].append(i)
        else:
            groups.append([i])
            downstream = set()
        downstream |= descendants(model, i)
    return groups
