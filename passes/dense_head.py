"""`dense-head`: Flatten→dense classifier heads become 1x1 convolutions + global average pooling.

Network in Network's second idea, applied to a trained model. Two cases:

* exact: the map is globally pooled (or already 1x1) before the flatten. `GAP → Flatten → Gemm`
  equals `Conv1x1 → GAP → Flatten` (pooling is linear), so the rewrite changes no number and the
  head accepts any input size.
* fitted: `Flatten(C×H×W) → Linear (→ act → Linear)…` becomes `Conv1x1(C→D) (→ act → Conv1x1)…
  → GAP → Flatten`. That throws away where features are, so it needs calibration data: the first
  layer starts as its spatial sum (exact for spatially flat features), the last layer of each
  branch is refitted in closed form (ridge, strength chosen on the held-out split) to the
  original pre-activation outputs, and `distill=N` (torch) can then train the new head on the
  cached feature maps. The feature maps are computed once, by onnxruntime, for all samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from passes import register
from passes.base import PassOptions, RewritePass, option
from rewriter.fidelity import compare_arrays, looks_like_scores
from rewriter.graph import Namer
from rewriter.head_match import DenseHead, DenseLayer, NoMatch, flatten_candidates, match_head
from rewriter.head_plan import (
    ConvPlan,
    clone_op,
    collapse_spatial,
    emit,
    exact_plan,
    forward,
    plan_leaves,
)
from rewriter.ridge import choose_lambda

#: Declared output error of exact rewrites (float rounding of a reordered sum).
EXACT_ERROR_BOUND = 1e-4


@dataclass
class DenseHeadOptions(PassOptions):
    hidden: int | None = option(
        None, "width of the first 1x1 conv of a fitted multi-layer head: none keeps the original "
        "width, 0 maps the features straight to each output with one 1x1 conv")
    distill: int = option(0, "train the new head this many steps on cached features against "
                          "the original outputs (needs torch); 0 = closed-form fit only")
    lr: float = option(1e-3, "Adam learning rate for distill")
    batch_size: int = option(64, "samples per distillation step")
    pooled: bool = option(True, "also rewrite heads that are globally pooled already (exact; "
                          "params unchanged, MACs grow by H×W, head becomes a class map)")

    def validate(self) -> None:
        if self.hidden is not None and self.hidden < 0:
            raise ValueError("hidden must be >= 0")
        if self.distill < 0:
            raise ValueError("distill must be >= 0")
        if self.lr <= 0 or self.batch_size <= 0:
            raise ValueError("lr and batch-size must be positive")


@dataclass
class _Split:
    """Cached feature maps and original leaf outputs of one calibration split."""

    values: dict[str, np.ndarray]
    labels: np.ndarray | None


@register
class DenseHeadPass(RewritePass):
    name = "dense-head"
    summary = "Flatten→dense heads become 1x1 convs + global average pooling (exact or fitted)"
    Options = DenseHeadOptions
    exact = False  # fitted heads change outputs; exact-only runs declare a bound instead

    def chooses_on_holdout(self) -> bool:
        return True  # fitted heads choose their ridge strength on the held-out split

    def apply(self, model: ir.Model) -> None:
        namer = Namer(model)
        fitted: list[DenseHead] = []
        for flatten in flatten_candidates(model.graph):
            try:
                head = match_head(flatten)
            except NoMatch as exc:
                self.report.skipped(flatten.name, flatten.op_type, str(exc))
                continue
            if head.pooled or head.positions == 1:
                self._rewrite_exact(model.graph, head, namer)
            elif not self.context.has_data:
                self._skip(head, "needs --calib (a fitted head is trained on calibration features)")
            else:
                fitted.append(head)
        if fitted:
            self._rewrite_fitted(model, fitted, namer)
        kinds = {d.details.get("kind") for d in self.report.decisions if d.applied}
        self.report.error_bound = EXACT_ERROR_BOUND if kinds <= {"exact"} else None

    # -------------------------------------------------------------------------- exact

    def _rewrite_exact(self, graph: ir.Graph, head: DenseHead, namer: Namer) -> None:
        if head.pooled and not self.options.pooled:
            self._skip(head, "globally pooled head left alone (pooled=false)")
            return
        if self.options.hidden is not None:
            self.report.note(f"{head.flatten.name}: hidden= applies to fitted heads only; the "
                             "exact rewrite keeps the original widths")
        roots = exact_plan(head)
        emit(graph, head, roots, namer)
        dense = "/".join(dict.fromkeys(root.op for root in head.roots))
        form = (f"GAP→{head.flatten.op_type}→{dense}" if head.pooled
                else f"{head.flatten.op_type} of a 1x1 map→{dense}")
        self._record(head, roots, "exact", f"exact: {form} became Conv1x1→GAP→Flatten", {})

    # -------------------------------------------------------------------------- fitted

    def _rewrite_fitted(self, model: ir.Model, heads: list[DenseHead], namer: Namer) -> None:
        names = _unique([h.features.name for h in heads]
                        + [leaf.output.name for h in heads for leaf in h.leaves])
        fit = _Split(self._capture(model, names, "fit"), self.context.fit.labels)
        holdout = self.context.holdout if self.context.holdout is not None else self.context.fit
        if holdout.n == 0:
            holdout = self.context.fit
        held = _Split(self._capture(model, names, "holdout" if holdout is not self.context.fit
                                    else "fit"), holdout.labels)
        for head in heads:
            try:
                roots, details = self._fit(head, fit, held)
            except NoMatch as exc:
                self._skip(head, str(exc))
                continue
            emit(model.graph, head, roots, namer)
            kind = details["kind"]
            h, w = head.spatial
            reason = (f"{kind}: {head.flatten.op_type}({head.channels}×{h}×{w})→dense head "
                      f"({head.depth} layers, {len(head.leaves)} outputs) became "
                      "Conv1x1→GAP→Flatten")
            self._record(head, roots, kind, reason, details)

    def _capture(self, model: ir.Model, names: list[str], split: str) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {}
        for batch in self.context.capture(model, names, split):
            for name, array in batch.items():
                parts.setdefault(name, []).append(array)
        return {name: np.concatenate(arrays) for name, arrays in parts.items()}

    def _fit(self, head: DenseHead, fit: _Split, held: _Split) -> tuple[list[ConvPlan], dict]:
        roots = self._initial_plan(head, fit)
        collapsed = None
        if any(np.any(leaf.weight) for leaf in plan_leaves(roots)):
            collapsed = self._fidelity(head, roots, held)
        f_fit, f_held = fit.values[head.features.name], held.values[head.features.name]
        pooled_fit, _ = forward(head, roots, f_fit)
        pooled_held, _ = forward(head, roots, f_held)
        lambdas = {}
        for leaf in plan_leaves(roots):
            target = leaf.source.output.name
            best, _ = choose_lambda(pooled_fit[id(leaf)], fit.values[target],
                                    pooled_held[id(leaf)], held.values[target],
                                    prior=leaf.weight)
            leaf.weight, leaf.bias = best.weight, best.bias
            lambdas[leaf.source.name] = best.lam
        details: dict[str, Any] = {"kind": "fitted", "ridge_lambda": lambdas,
                                   "fit_samples": len(f_fit), "holdout_samples": len(f_held)}
        if collapsed is not None:
            details["fidelity_collapsed"] = collapsed  # spatial collapse, before the ridge fit
        fidelity = self._fidelity(head, roots, held)
        details["fidelity_fitted"] = fidelity
        if self.options.distill:
            fitted_roots = [root.clone() for root in roots]
            from rewriter.distill_head import distill_head

            targets = {id(leaf): fit.values[leaf.source.output.name] for leaf in plan_leaves(roots)}
            history = distill_head(head, roots, f_fit, targets, steps=self.options.distill,
                                   lr=self.options.lr, batch_size=self.options.batch_size,
                                   seed=self.context.seed)
            distilled = self._fidelity(head, roots, held)
            details["fidelity_distilled"] = distilled
            details["distill"] = history
            if distilled["rel_l2"] <= fidelity["rel_l2"]:
                details["kind"], fidelity = "distilled", distilled
            else:
                roots = fitted_roots
                self.report.note(f"{head.flatten.name}: distillation did not lower the held-out "
                                 "error; kept the closed-form fit")
        details["fidelity"] = fidelity
        optimistic = ("fitted heads choose the ridge strength on the held-out split, so their "
                      "held-out fidelity is slightly optimistic")
        if optimistic not in self.report.notes:
            self.report.note(optimistic)
        return roots, details

    def _initial_plan(self, head: DenseHead, fit: _Split) -> list[ConvPlan]:
        """Spatially collapsed first layer, original interior layers, leaves to be refitted."""
        hidden = self.options.hidden
        if head.depth == 1:
            return [ConvPlan(root, collapse_spatial(head, root.weight), root.bias.copy())
                    for root in head.roots]
        if hidden == 0:  # no start point: the ridge fit alone sets each branch's 1x1 conv
            return [ConvPlan(leaf, np.zeros((leaf.weight.shape[0], head.channels)), leaf.bias)
                    for leaf in head.leaves]

        def convert(layer: DenseLayer, first: bool) -> ConvPlan:
            weight = collapse_spatial(head, layer.weight) if first else layer.weight
            return ConvPlan(layer, weight, layer.bias.copy(), [clone_op(op) for op in layer.post],
                            [convert(c, False) for c in layer.children])

        roots = [convert(root, True) for root in head.roots]
        if hidden is not None:
            features = fit.values[head.features.name]
            roots = [_narrow(head, root, hidden, features) for root in roots]
        return roots

    def _fidelity(self, head: DenseHead, roots: list[ConvPlan], held: _Split) -> dict[str, Any]:
        """Held-out error of each leaf against the original, and accuracy when labels exist."""
        _, outputs = forward(head, roots, held.values[head.features.name])
        per_leaf: dict[str, Any] = {}
        for leaf in plan_leaves(roots):
            ref = held.values[leaf.source.output.name]
            got = outputs[id(leaf)]
            metrics: dict[str, Any] = compare_arrays(ref, got)
            labels = held.labels
            if labels is not None and looks_like_scores(ref) and len(labels) == len(ref) \
                    and np.issubdtype(np.asarray(labels).dtype, np.integer) \
                    and 0 <= labels.min() and labels.max() < ref.shape[1]:
                metrics["accuracy_before"] = float(np.mean(ref.argmax(1) == labels))
                metrics["accuracy_after"] = float(np.mean(got.argmax(1) == labels))
            if looks_like_scores(ref):
                metrics["top1_agreement"] = float(np.mean(ref.argmax(1) == got.argmax(1)))
            per_leaf[leaf.source.output.name] = metrics
        worst = max(per_leaf.values(), key=lambda m: m["rel_l2"])
        return {**worst, "per_output": per_leaf}

    # -------------------------------------------------------------------------- report

    def _skip(self, head: DenseHead, reason: str) -> None:
        first = head.roots[0]
        self.report.skipped(first.name, first.op, reason, params_before=head.n_params())

    def _record(self, head: DenseHead, roots: list[ConvPlan], kind: str, reason: str,
                details: dict[str, Any]) -> None:
        first = head.roots[0]
        positions = _positions(head)
        plans = [p for r in roots for p in r.walk()]
        macs_before = sum(layer.weight.size for layer in head.layers)
        macs_after = None if positions is None else sum(p.weight.size for p in plans) * positions
        details = {"kind": kind, **details,
                   "layers_before": [f"{layer.op} {layer.weight.shape[1]}→{layer.weight.shape[0]}"
                                     for layer in head.layers],
                   "layers_after": [f"Conv1x1 {p.weight.shape[1]}→{p.weight.shape[0]}"
                                    for p in plans],
                   "branches": len(plan_leaves(roots))}
        if head.permutation is not None:
            details["folded_transpose"] = list(head.permutation)
        self.report.applied(first.name, first.op, reason,
                            params_before=head.n_params(),
                            params_after=sum(p.n_params() for p in plans),
                            macs_before=macs_before, macs_after=macs_after, details=details)
        fidelity = details.get("fidelity")
        if fidelity:
            for key in ("accuracy_before", "accuracy_after", "rel_l2", "cosine"):
                if key in fidelity:
                    self.report.metrics[f"holdout_{key}"] = fidelity[key]


def _positions(head: DenseHead) -> int | None:
    """Positions the new 1x1 convs run at per sample (None when the map size is dynamic)."""
    return head.spatial[0] * head.spatial[1] if head.spatial is not None else None


def _unique(names: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _narrow(head: DenseHead, root: ConvPlan, width: int, features: np.ndarray) -> ConvPlan:
    """Keep the `width` first-layer units that contribute most (activation spread × outgoing
    weight norm) on calibration features; the layers below are refitted afterwards anyway."""
    out = root.weight.shape[0]
    if root.is_leaf:
        return root
    if width > out:
        raise NoMatch(f"hidden={width} is wider than the first dense layer ({out})")
    if width == out:
        return root
    probe = ConvPlan(root.source, root.weight, root.bias, root.post,
                     [ConvPlan(root.source, np.eye(out), np.zeros(out))])
    pooled, _ = forward(head, [probe], features)
    activation = next(iter(pooled.values()))
    outgoing = sum(np.linalg.norm(child.weight, axis=0) for child in root.children)
    keep = np.sort(np.argsort(-(activation.std(axis=0) * outgoing), kind="stable")[:width])
    root.weight, root.bias = root.weight[keep], root.bias[keep]
    for op in root.post:
        for role, param in op.params.items():
            if param.size == out:
                op.params[role] = param.reshape(-1)[keep]
    for child in root.children:
        child.weight = child.weight[:, keep]
    return root


__all__ = ["DenseHeadOptions", "DenseHeadPass"]
