"""Distillation after the passes: train only the weights the passes created so the rewritten
model's outputs match the original's on unlabeled calibration inputs.

The teacher is the original model run once in onnxruntime; the student is the rewritten IR run
by the torch executor (`rewriter.torch_exec`). Loss: mean squared error per output, divided by the
teacher output's mean square so several outputs weigh alike. Seeded sampling and init make runs
repeatable. With output groups (a detector's box rows and class-score rows, `rewriter.groups`) the
loss is per group instead, each group's squared error divided by its own teacher mean square, so the
small [0, 1] class scores weigh as much as the pixel boxes (a per-output loss trains the boxes and
leaves the scores, the task, untrained). Trained values are written back by name, and only when
they did better on the held-out samples than the untrained ones (the data-free result stands
otherwise).
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from rewriter import runtime
from rewriter.calibration import CalibrationSet
from rewriter.errors import PassError
from rewriter.groups import OutputGroup
from rewriter.options import option, parse_options
from rewriter.progress import Counter
from rewriter.report import PassReport


@dataclass
class DistillOptions:
    steps: int = option(500, "optimizer steps")
    lr: float = option(1e-3, "Adam learning rate (cosine-decayed to 0 over the steps)", gt=0)
    batch: int = option(32, "samples per step", ge=1)
    train: list[str] = option(
        ["new"], "weights to train: 'new' (created by the passes), 'all', or name globs (a+b)"
    )
    weight_decay: float = option(0.0, "Adam weight decay")
    keep_worse: bool = option(False, "write trained weights back even if held-out loss got worse")
    log_every: int = option(50, "log the loss every this many steps", ge=1)
    flip: bool = option(
        True, "also train on the image inputs mirrored left-right, teacher outputs computed for "
        "them (twice the samples: a small calibration set is otherwise learned by heart)"
    )


def parse_distill_options(
    raw: str | Mapping[str, Any] | DistillOptions | None,
) -> DistillOptions:
    """`steps=500,lr=1e-3` (the one `key=value` grammar) or a mapping -> DistillOptions."""
    if isinstance(raw, DistillOptions):
        return raw
    return parse_options(DistillOptions, raw or {}, "distill")


def new_weight_names(original: ir.Model, rewritten: ir.Model) -> list[str]:
    """Float weights of `rewritten` whose names the original model does not have."""
    from rewriter.torch_exec import float_weights

    known = set(float_weights(original))
    return [name for name in float_weights(rewritten) if name not in known]


def select_trainable(original: ir.Model, rewritten: ir.Model, patterns: list[str]) -> list[str]:
    """Names to train: 'new' weights, 'all' weights, or those matching the globs."""
    from rewriter.torch_exec import float_weights

    names = list(float_weights(rewritten))
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern == "new":
            chosen.update(new_weight_names(original, rewritten))
        elif pattern == "all":
            chosen.update(names)
        else:
            chosen.update(n for n in names if fnmatch.fnmatchcase(n, pattern))
    return [n for n in names if n in chosen]


def distill(
    original: ir.Model,
    model: ir.Model,
    fit: CalibrationSet | None,
    holdout: CalibrationSet | None,
    options: DistillOptions | str | Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    groups: Sequence[OutputGroup] = (),
) -> PassReport:
    """Train `model`'s new weights in place against `original`'s outputs; the step's report."""
    opts = options if isinstance(options, DistillOptions) else parse_distill_options(options)
    log = log or (lambda message: None)
    report = PassReport("distill", options=asdict(opts), exact=False)
    if fit is None or fit.n == 0:
        raise PassError("distillation needs calibration inputs: pass --calib (npz, images, random)")
    from rewriter.torch_exec import check_fine_tunable

    try:
        check_fine_tunable(model)
    except PassError as exc:
        report.skipped("model", "distill", str(exc))
        report.note("the rewritten weights stand untrained")
        return report
    trainable = select_trainable(original, model, opts.train)
    if not trainable:
        report.skipped("model", "distill", "no weights to train (no pass created new weights)")
        return report
    _train(original, model, fit, holdout or fit, trainable, opts, seed, log, report, groups)
    return report


def _train(original, model, fit, holdout, trainable, opts, seed, log, report, groups) -> None:
    import torch

    from rewriter.torch_exec import to_torch, write_back

    torch.manual_seed(seed)
    fit_inputs = mirrored(fit.inputs) if opts.flip else dict(fit.inputs)
    fit_n = len(next(iter(fit_inputs.values())))
    teacher_fit = runtime.run_all(original, fit_inputs)
    teacher_hold = runtime.run_all(original, holdout.inputs)
    module = to_torch(model, trainable)
    names = module.output_names
    terms = loss_terms(names, groups, teacher_fit)
    report.metrics["loss_terms"] = [label for _, _, label, _ in terms]

    def loss_on(inputs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray]) -> Any:
        outs = module(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()
                         if k in module.input_names})
        outs = dict(zip(names, outs if isinstance(outs, tuple) else (outs,), strict=True))
        total = 0.0
        for name, rows, _, scale in terms:
            got, want = outs[name], torch.from_numpy(targets[name])
            if rows is not None:  # the group's rows: a slice of its feature axis (maybe strided)
                axis, start, stop, step = rows
                index = (slice(None),) * axis + (slice(start, stop, step),)
                got, want = got[index], want[index]
            total = total + torch.mean((got - want) ** 2) / scale
        return total / len(terms)

    def held_out_loss() -> float:
        with torch.no_grad():
            total, count = 0.0, 0
            for start in range(0, holdout.n, opts.batch):
                part = slice(start, start + opts.batch)
                batch = {k: v[part] for k, v in holdout.inputs.items()}
                size = len(next(iter(batch.values())))
                total += float(loss_on(batch, {n: teacher_hold[n][part] for n in names})) * size
                count += size
            return total / max(count, 1)

    params = [p for p in module.params.values() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(opts.steps, 1))
    rng = np.random.default_rng(seed)
    before = held_out_loss()
    log(f"distill: training {len(trainable)} weights ({sum(p.numel() for p in params)} values), "
        f"{opts.steps} steps, held-out loss {before:.4g}")
    started = time.perf_counter()
    module.train()
    steps = Counter(opts.steps, "distill step")
    for step in range(1, opts.steps + 1):
        index = np.sort(rng.choice(fit_n, size=min(opts.batch, fit_n), replace=False))
        loss = loss_on({k: v[index] for k, v in fit_inputs.items()},
                       {n: teacher_fit[n][index] for n in names})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(opts.log_every, 1) == 0 or step == opts.steps:
            log(f"distill: step {step}/{opts.steps} loss {float(loss.detach()):.4g}")
        steps.advance()
    steps.close()
    after = held_out_loss()
    improved = after < before
    report.metrics.update({
        "loss_before": before, "loss_after": after, "steps": opts.steps,
        "train_seconds": round(time.perf_counter() - started, 2),
        "trained_values": int(sum(p.numel() for p in params)),
        "train_samples": fit_n,
    })
    if improved or opts.keep_worse:
        write_back(module, model)
        for name in trainable:
            size = int(module.params[module.param_key[name]].numel())
            report.applied(name, "weight", "trained", params_before=size, params_after=size)
    else:
        report.skipped("model", "distill",
                       f"held-out loss got worse ({before:.4g} -> {after:.4g}); "
                       "untrained weights kept")
    log(f"distill: held-out loss {before:.4g} -> {after:.4g}"
        + ("" if improved or opts.keep_worse else " (worse: kept the untrained weights)"))


def mirrored(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The samples followed by their left-right mirror images, when every input is an image batch
    (4-D float, N x C x H x W); other inputs (tokens, sequences) have no safe mirror: unchanged."""
    if not inputs or not all(v.ndim == 4 and v.dtype.kind == "f" for v in inputs.values()):
        return dict(inputs)
    return {k: np.concatenate([v, v[..., ::-1]]) for k, v in inputs.items()}


LossTerm = tuple[str, "tuple[int, int, int, int] | None", str, float]


def loss_terms(
    names: Sequence[str], groups: Sequence[OutputGroup], teacher: Mapping[str, np.ndarray]
) -> list[LossTerm]:
    """(output, (axis, start, stop, step) or None, label, teacher mean square) per loss term.

    One term per output group of a distilled output, one per whole output without groups; the
    scale is floored so an all-zero group cannot divide by zero.
    """
    terms: list[LossTerm] = []
    for name in names:
        array = teacher[name]
        mine = [g for g in groups if g.output == name and g.axis is not None
                and g.axis < array.ndim]
        if not mine:
            terms.append((name, None, name, _mean_square(array)))
            continue
        for group in mine:
            axis = group.axis
            assert axis is not None
            stop = array.shape[axis] if group.stop is None else group.stop
            part = np.take(array, np.arange(group.start, stop, group.step), axis=axis)
            terms.append((name, (axis, group.start, stop, group.step), group.label,
                          _mean_square(part)))
    return terms


def _mean_square(array: np.ndarray) -> float:
    return max(float(np.mean(np.square(array, dtype=np.float64))), 1e-12)
