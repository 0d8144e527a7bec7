"""`quantize`: onnxruntime static int8 (QDQ), with the nodes that break the task kept in float.

What a deployment engineer would pick instead of our rewrites is `quantize_static`, so this pass
wraps it rather than competing with it: the current model is written to a temp folder,
pre-processed (`quant_pre_process`), calibrated on the run's own fit samples and quantized to
QDQ with per-channel weights. Static int8 is known to break some models outright (a detector
whose box pixels and sigmoid scores share one output range loses every detection), so with
`auto-exclude` (default) the task error of the result is measured on held-out samples against
the float model, and blocks that grow back from the outputs (decode tail, then the last convs)
are kept in float greedily by error removed per MAC kept in float, until `max-error` holds, the
float share reaches `max-float` or `max-calls` quantize_static calls are spent. Calibration
runs once (ranges cached), so each further call is a QDQ rewrite plus one held-out run.

The result is not exact: the guard treats it as a bounded pass (its bound is the error measured
here on the same held-out samples), and its fidelity is measured like every other pass's. It
must be the last pass: nothing in this project rewrites QDQ graphs.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import onnx
import onnx_ir as ir
from rewriter.passes import register
from rewriter.passes.base import PassOptions, RewritePass, option

from rewriter import int8_exclusion as blocks
from rewriter.context import PassContext
from rewriter.errors import PassError
from rewriter.fidelity import task_error, worst_group_rel_l2
from rewriter.int8 import StaticQuantizer, preprocess, prune_opset_imports, upgrade_opset

#: Default task-error gate: the worst output group's error on the `1 - cosine` scale
#: (0.02: every group's cosine >= 0.98 and at most 4% of score decisions flip).
DEFAULT_MAX_ERROR = 0.02
#: Above this many bytes of weights the float copy handed to onnxruntime uses external data.
LARGE_MODEL_BYTES = 1_500_000_000
#: MAC floor of a block when ranking by error per MAC (a decode tail has almost none).
MAC_FLOOR_SHARE = 0.01
#: A block kept in float must lower the task error by at least this share of it: a smaller drop
#: costs int8 speed for nothing the gate can see.
MIN_ERROR_DROP = 0.05


@dataclasses.dataclass
class QuantizeOptions(PassOptions):
    activation: Literal["uint8", "int8"] = option(
        "uint8", "activation type (uint8 with int8 weights: onnxruntime's fast x86 CPU kernels)"
    )
    weight: Literal["int8", "uint8"] = option("int8", "weight type")
    method: Literal["minmax", "entropy", "percentile"] = option(
        "minmax", "calibration method for activation ranges"
    )
    per_channel: bool = option(True, "per-output-channel weight scales")
    exclude: list[str] = option([], "node-name globs kept in float (several: a*+b*)")
    auto_exclude: bool = option(
        True, "keep nodes in float, chosen by measured task error, until max-error holds"
    )
    max_error: float = option(
        DEFAULT_MAX_ERROR, "auto-exclude target: worst output group's task error on held-out data"
    )
    max_float: float = option(
        0.5, "auto-exclude stops before this share of compute MACs would run in float"
    )
    max_calls: int = option(10, "quantize_static calls auto-exclusion may make (>= 1)")
    samples: int = option(64, "calibration samples used at most (from the fit split)")
    preprocess: bool = option(True, "run onnxruntime's quant_pre_process first")

    def validate(self) -> None:
        self.exclude = [p for item in self.exclude for p in str(item).split("+") if p]
        if self.max_error < 0:
            raise ValueError("max-error must be >= 0")
        if not 0 < self.max_float <= 1:
            raise ValueError("max-float must be in (0, 1]")
        if self.max_calls < 1:
            raise ValueError("max-calls must be >= 1")
        if self.samples < 1:
            raise ValueError("samples must be >= 1")


@register
class Quantize(RewritePass):
    """onnxruntime static int8 (QDQ) with measured auto-exclusion; runs last."""

    name = "quantize"
    summary = "onnxruntime static int8 (QDQ, per-channel), nodes that break the task kept float"
    Options = QuantizeOptions
    exact = False
    runs_last: ClassVar[bool] = True

    def __init__(
        self,
        options: PassOptions | Mapping[str, Any] | None = None,
        context: PassContext | None = None,
    ) -> None:
        if isinstance(options, Mapping):  # `activation-type` reads as the issue and ORT say it
            options = {_alias(k): v for k, v in options.items()}
        super().__init__(options, context)

    def apply(self, model: ir.Model) -> None:
        opts: QuantizeOptions = self.options  # type: ignore[assignment]
        ctx = self.context
        if not ctx.has_data:
            raise PassError(
                "pass 'quantize' needs calibration data (--calib): static int8 measures "
                "activation ranges on real samples"
            )
        if ctx.synthetic:
            self.report.note("calibration data is random: int8 ranges from it mean little")
        _match_globs(opts.exclude, [n.name for n in model.graph])  # bad globs fail up front
        with tempfile.TemporaryDirectory(prefix="onexone-quantize-") as tmp:
            folder = Path(tmp)
            float_path = folder / "float.onnx"
            big = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                      if v.const_value is not None) > LARGE_MODEL_BYTES
            ir.save(model, float_path, external_data="float.onnx.data" if big else None)
            source, why = (
                preprocess(float_path, folder / "pre.onnx")
                if opts.preprocess else (float_path, "quant_pre_process off (preprocess=false)")
            )
            if why:
                self.report.note(why)
            per_channel = opts.per_channel
            if per_channel:
                upgraded, why = upgrade_opset(source, folder / "opset13.onnx")
                if why:
                    self.report.note(why)
                if upgraded == source and why:  # conversion failed: per-tensor weights
                    per_channel = False
                    self.report.note("weights quantized per tensor (per-channel needs opset 13)")
                source = upgraded
            proto = _named_nodes(onnx.load(str(source)), source)
            graph = blocks.NodeGraph(proto)
            user = _match_globs(opts.exclude, graph.order, self.report.note)
            macs = _node_macs(source, ctx.input_shapes)
            fit = ctx.fit.inputs
            n = min(opts.samples, ctx.fit.n)
            quantizer = StaticQuantizer(
                source, folder, {k: v[:n] for k, v in fit.items()}, opts.activation,
                opts.weight, opts.method, per_channel, batch=_fixed_batch(proto),
            )
            ctx.log(
                f"quantize: calibrating {n} samples ({opts.method}), QDQ "
                f"{opts.activation} activations / {opts.weight} weights"
            )
            search = ExclusionSearch(self, quantizer, graph, macs, user, float_path)
            path = search.run()
            result = onnx.load(str(path))
            prune_opset_imports(result)
            _adopt(model, result)
        self._record(result, graph, macs, user, search, n)

    # ------------------------------------------------------------------ report

    def _record(
        self, result: onnx.ModelProto, graph: blocks.NodeGraph, macs: Mapping[str, int],
        user: Mapping[str, str], search: ExclusionSearch, samples: int,
    ) -> None:
        opts: QuantizeOptions = self.options  # type: ignore[assignment]
        quantized = _quantized_nodes(result)
        auto = {node: step for step in search.steps for node in step["nodes"]}
        for name in graph.order:
            op = graph.nodes[name].op_type
            cost = macs.get(name)
            if name in user:
                self.report.skipped(name, op, f"kept in float: exclude={user[name]}",
                                    macs_before=cost, macs_after=cost)
            elif name in auto:
                step = auto[name]
                self.report.skipped(
                    name, op,
                    f"kept in float by auto-exclude step {step['step']} ({step['block']}): task "
                    f"error {step['error_before']:.4g} -> {step['error_after']:.4g}",
                    macs_before=cost, macs_after=cost,
                    details={"step": step["step"], "block_macs_in_float": step["macs"]},
                )
            elif name in quantized:
                self.report.applied(name, op, "int8 (QDQ)", macs_before=cost, macs_after=cost)
            elif op in blocks.COMPUTE_OPS:
                self.report.skipped(name, op, "left in float by onnxruntime (not quantizable)",
                                    macs_before=cost, macs_after=cost)
        total = sum(macs.get(n, 0) for n in graph.order if graph.is_compute(n))
        float_macs = sum(
            macs.get(n, 0) for n in graph.order
            if graph.is_compute(n) and n not in quantized
        )
        self.report.metrics.update({
            "quantize_static_calls": search.quantizer.calls,
            "calibration_samples": samples,
            "holdout_samples": search.holdout_n,
            "method": opts.method,
            "task_error_plain": search.plain_error,
            "task_error": search.error,
            "max_error": opts.max_error,
            "gate_met": None if search.error is None else search.error <= opts.max_error,
            "float_macs_share": round(float_macs / total, 4) if total else 0.0,
            "excluded": [
                {"block": s["block"], "nodes": list(s["nodes"]), "macs_in_float": s["macs"],
                 "task_error_before": s["error_before"], "task_error_after": s["error_after"]}
                for s in search.steps
            ],
            "excluded_by_user": sorted(user),
        })
        if search.rel_l2 is not None:  # the guard re-measures this on the same samples
            self.report.error_bound = search.rel_l2 * 1.25 + 1e-6


class ExclusionSearch:
    """Plain static int8, then (auto-exclude) blocks kept in float by measured task error."""

    def __init__(
        self, owner: Quantize, quantizer: StaticQuantizer, graph: blocks.NodeGraph,
        macs: Mapping[str, int], user: Mapping[str, str], float_path: Path,
    ) -> None:
        self.owner, self.quantizer, self.graph, self.macs = owner, quantizer, graph, macs
        self.options: QuantizeOptions = owner.options  # type: ignore[assignment]
        self.in_float: list[str] = list(user)
        self.float_path = float_path
        self.steps: list[dict[str, Any]] = []
        self.plain_error: float | None = None
        self.error: float | None = None
        self.rel_l2: float | None = None
        self.holdout_n = 0
        #: blocks that did not lower the error alone, offered again with what feeds them
        self.carried: blocks.Block | None = None
        self.total_macs = sum(macs.get(n, 0) for n in graph.order if graph.is_compute(n))

    def run(self) -> Path:
        ctx, opts, report = self.owner.context, self.options, self.owner.report
        path = self.quantizer.quantize(self.in_float, "plain")
        holdout = ctx.holdout
        if holdout is None or holdout.n == 0:
            report.note("no held-out samples: task error not measured, nothing auto-excluded")
            return path
        self.holdout_n = holdout.n
        self.reference = _outputs(self.float_path, holdout.inputs)
        self.error = self.plain_error = self._error(path)
        ctx.log(f"quantize: plain static int8 task error {self.error:.4g} "
                f"(target {opts.max_error:g}) on {holdout.n} held-out samples")
        if opts.auto_exclude and self.error > opts.max_error:
            ctx.log(f"quantize: auto-exclusion, at most {opts.max_calls} quantize_static calls "
                    "(calibration ranges cached where onnxruntime supports it)")
            path = self._grow_float_region(path)
        elif self.error > opts.max_error:
            report.note(f"task error {self.error:.4g} above max-error {opts.max_error:g} "
                        "(auto-exclude=false)")
        self.rel_l2 = worst_group_rel_l2(self.reference, _outputs(path, holdout.inputs),
                                         getattr(ctx, "groups", None))
        return path

    def _error(self, path: Path) -> float:
        """Worst output group's task error of the model at `path` vs the float model."""
        got = _outputs(path, self.owner.context.holdout.inputs)
        return float(task_error(self.reference, got, getattr(self.owner.context, "groups", None)))

    def _float_macs(self, nodes: Sequence[str]) -> int:
        return sum(self.macs.get(n, 0) for n in set(nodes) if self.graph.is_compute(n))

    def _candidates(self, remaining: int) -> list[blocks.Block]:
        """The tail first; then the frontier compute ops, each and all together. Blocks that
        did not lower the error (`carried`) are offered again with the ops feeding them."""
        floating = set(self.in_float)
        carried = self.carried
        covered = floating | set(carried.nodes if carried else ())
        tail = blocks.tail_block(self.graph, self.macs)
        if tail is not None and not set(tail.nodes) <= covered:
            return [tail]
        frontier = blocks.frontier_blocks(self.graph, covered, self.macs)
        if len(frontier) > 1:
            merged = blocks.merge_blocks(frontier, f"all {len(frontier)} frontier compute ops")
            frontier = [*frontier, merged] if len(frontier) + 1 <= remaining else [merged]
        if carried is not None:
            frontier = [blocks.merge_blocks([b, carried], f"{b.name} (with {carried.name})")
                        for b in frontier]
        return frontier

    def _grow_float_region(self, path: Path) -> Path:
        opts, report, log = self.options, self.owner.report, self.owner.context.log
        floor = max(1, int(MAC_FLOOR_SHARE * self.total_macs))
        while self.error > opts.max_error:
            remaining = opts.max_calls - self.quantizer.calls
            if remaining <= 0:
                report.note(f"auto-exclude stopped: max-calls={opts.max_calls} quantize_static "
                            f"calls spent, task error {self.error:.4g} > {opts.max_error:g}")
                break
            affordable = []
            for block in self._candidates(remaining):
                share = self._float_macs([*self.in_float, *block.nodes]) / max(self.total_macs, 1)
                if share < opts.max_float:
                    affordable.append(block)
            if not affordable:
                report.note(f"auto-exclude stopped: keeping more in float would pass "
                            f"max-float={opts.max_float:g} of compute MACs (speed gain gone); "
                            f"task error {self.error:.4g} > {opts.max_error:g}")
                break
            best = None
            for block in affordable[:remaining]:
                trial = self.quantizer.quantize([*self.in_float, *block.nodes], "trial")
                error = self._error(trial)
                gain = (self.error - error) / max(self._float_macs(block.nodes), floor)
                log(f"quantize: [{self.quantizer.calls}/{opts.max_calls}] float {block.name}: "
                    f"task error {error:.4g}")
                if error < self.error * (1 - MIN_ERROR_DROP) and (best is None
                                                                  or gain > best[0]):
                    best = (gain, block, trial, error)
            if best is None and self.quantizer.calls < opts.max_calls:
                # nothing helped alone: look one step further back, keeping these blocks
                tried = affordable[:remaining]
                self.carried = blocks.merge_blocks(
                    [*tried, *([self.carried] if self.carried else [])],
                    " + ".join(b.name for b in tried)[:120])
                if blocks.frontier_blocks(self.graph, set(self.in_float) | set(
                        self.carried.nodes), self.macs):
                    continue
            if best is None:
                report.note(f"auto-exclude stopped: no candidate block lowers the task error "
                            f"{self.error:.4g} by {MIN_ERROR_DROP:.0%} or more "
                            f"(target {opts.max_error:g})")
                break
            _, block, path, error = best
            new = [n for n in block.nodes if n not in self.in_float]
            self.steps.append({
                "step": len(self.steps) + 1, "block": block.name, "nodes": new,
                "macs": self._float_macs(new), "error_before": self.error, "error_after": error,
            })
            self.in_float.extend(new)
            self.error = error
            self.carried = None
        if self.error > opts.max_error and not self.steps:
            report.note(f"task error {self.error:.4g} above max-error {opts.max_error:g}")
        return path


# ---------------------------------------------------------------------- helpers


def _alias(key: str) -> str:
    return {"activation-type": "activation", "activation_type": "activation",
            "weight-type": "weight", "weight_type": "weight"}.get(str(key), key)


def _match_globs(
    patterns: Sequence[str], names: Sequence[str], note: Callable[[str], None] | None = None
) -> dict[str, str]:
    """Node name -> the glob that matched it. A glob matching no node is a bad option; after
    pre-processing (which fuses BatchNormalization away) it is only noted."""
    matched: dict[str, str] = {}
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits and note is not None:
            note(f"exclude={pattern}: its nodes were fused away by pre-processing")
            continue
        if not hits:
            sample = ", ".join(names[:5])
            raise PassError(f"pass 'quantize': exclude={pattern} matches no node "
                            f"(nodes are named like {sample}, ...)")
        for name in hits:
            matched.setdefault(name, pattern)
    return matched


def _named_nodes(proto: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """Give unnamed nodes a name (exclusion works by name); rewrites `path` when it did."""
    unnamed = blocks.unnamed_nodes(proto)
    if unnamed:
        taken = {n.name for n in proto.graph.node}
        for i in unnamed:
            node = proto.graph.node[i]
            name, k = f"{node.op_type}_{i}", 0
            while name in taken:
                k += 1
                name = f"{node.op_type}_{i}_{k}"
            node.name = name
            taken.add(name)
        onnx.save(proto, str(path))
    return proto


def _node_macs(path: Path, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """MACs per node name at the run's input shapes (batch 1), for the speed proxy."""
    from rewriter.cost import node_cost
    from rewriter.shapes import with_input_shapes

    model = with_input_shapes(ir.load(str(path)), input_shapes)
    return {node.name: int(node_cost(node).macs or 0) for node in model.graph}


def _fixed_batch(proto: onnx.ModelProto) -> int:
    """The batch size calibration batches must have: the first input's static leading dim."""
    initializers = {t.name for t in proto.graph.initializer}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
        break
    return 1


def _outputs(path: Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All outputs of the model file at `path` on `inputs` (onnxruntime CPU)."""
    from rewriter.runtime import run_file

    return run_file(path, inputs)


def _quantized_nodes(proto: onnx.ModelProto) -> set[str]:
    """Nodes of the QDQ model that read a DequantizeLinear output (they run in int8)."""
    dq_outputs = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {
        n.name for n in proto.graph.node
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
        and any(i in dq_outputs for i in n.input)
    }


def _adopt(model: ir.Model, proto: onnx.ModelProto) -> None:
    """Put the quantized graph into `model` in place (callers hold `model`)."""
    from rewriter.io import load

    quantized = load(proto)
    model.graph = quantized.graph
    model.ir_version = quantized.ir_version
    model.functions.clear()
    model.functions.update(quantized.functions)
