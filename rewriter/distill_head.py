"""Train only a new head on cached feature maps against the original head's outputs (torch).

The trunk is not run: the feature maps were computed once by onnxruntime, so each step costs
a few small matmuls. Whole-network distillation belongs to the IR→torch executor. Deterministic
for a seed (CPU, fixed sample order, torch's deterministic algorithms).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rewriter.errors import PassError
from rewriter.head_match import PASS_THROUGH, DenseHead, Elementwise
from rewriter.head_plan import ConvPlan, channel_param


def _import_torch():
    try:
        import torch
    except ImportError:
        raise PassError("dense-head distill=N needs torch: pip install 'onexone[finetune]' "
                        "(or use distill=0 for the closed-form fit only)") from None
    return torch


def distill_head(
    head: DenseHead,
    roots: list[ConvPlan],
    features: np.ndarray,
    targets: dict[int, np.ndarray],
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Minimise the variance-normalised MSE of every leaf; weights are written back into `roots`.

    `targets` maps id() of each leaf plan to the original pre-activation outputs [N, K].
    Returns the loss at the start and the end (for the report).
    """
    torch = _import_torch()
    plans = [p for root in roots for p in root.walk()]
    leaves = [p for p in plans if p.is_leaf]
    generator = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only add contention
    try:
        return _train(torch, head, roots, features, targets, plans, leaves, generator,
                      steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    finally:
        torch.set_num_threads(threads)


def _train(torch, head, roots, features, targets, plans, leaves, generator, *, steps, lr,
           batch_size, seed) -> dict[str, Any]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        weights = [torch.nn.Parameter(torch.tensor(p.weight, dtype=torch.float32)) for p in plans]
        biases = [torch.nn.Parameter(torch.tensor(p.bias, dtype=torch.float32)) for p in plans]
        index = {id(p): i for i, p in enumerate(plans)}
        x_all = torch.tensor(np.asarray(features, np.float32)).flatten(2)
        y_all = {id(leaf): torch.tensor(np.asarray(targets[id(leaf)], np.float32))
                 for leaf in leaves}
        scale = {k: v.var(dim=0).mean().clamp_min(1e-8) for k, v in y_all.items()}

        def run(x):
            for op in head.pre:
                x = _torch_op(torch, op, x)
            out = {}

            def visit(plan: ConvPlan, x):
                i = index[id(plan)]
                if plan.is_leaf:
                    out[id(plan)] = x.mean(dim=2) @ weights[i].T + biases[i]
                    return
                z = torch.einsum("oc,ncp->nop", weights[i], x) + biases[i][:, None]
                for op in plan.post:
                    z = _torch_op(torch, op, z)
                for child in plan.children:
                    visit(child, z)

            for root in roots:
                visit(root, x)
            return out

        def loss_on(rows):
            preds = run(x_all[rows])
            return sum(((preds[k] - y_all[k][rows]) ** 2).mean() / scale[k] for k in preds)

        optimizer = torch.optim.Adam([*weights, *biases], lr=lr)
        everything = torch.arange(len(x_all))
        with torch.no_grad():
            start = float(loss_on(everything))
        n = len(x_all)
        order = torch.randperm(n, generator=generator)
        cursor = 0
        for _ in range(steps):
            if cursor + batch_size > n:
                order, cursor = torch.randperm(n, generator=generator), 0
            rows = order[cursor: cursor + batch_size]
            cursor += batch_size
            optimizer.zero_grad()
            loss = loss_on(rows)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            end = float(loss_on(everything))
    for plan, w, b in zip(plans, weights, biases, strict=True):
        plan.weight = w.detach().double().numpy()
        plan.bias = b.detach().double().numpy()
    return {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
            "train_loss_start": start, "train_loss_end": end}


def _torch_op(torch, op: Elementwise, x):
    """The op on [N, C, P] in torch (same semantics as head_plan.apply_elementwise)."""
    a = op.attrs
    kind = op.op
    if kind in PASS_THROUGH:
        return x
    if kind == "Relu":
        return torch.relu(x)
    if kind == "LeakyRelu":
        return torch.nn.functional.leaky_relu(x, a.get("alpha", 0.01))
    if kind == "PRelu":
        slope = torch.tensor(channel_param(op.params["slope"], x.shape[1], 3), dtype=x.dtype)
        return torch.where(x >= 0, x, slope * x)
    if kind == "Sigmoid":
        return torch.sigmoid(x)
    if kind == "Tanh":
        return torch.tanh(x)
    if kind == "HardSigmoid":
        return torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0.0, 1.0)
    if kind == "HardSwish":
        return x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)
    if kind == "Elu":
        return torch.nn.functional.elu(x, a.get("alpha", 1.0))
    if kind == "Clip":
        low = float(op.params.get("min", np.array(a.get("min", -np.inf))))
        high = float(op.params.get("max", np.array(a.get("max", np.inf))))
        return torch.clamp(x, low, high)
    if kind == "BatchNormalization":
        p = op.params
        c = x.shape[1]
        scale = p["scale"] / np.sqrt(p["var"] + a.get("epsilon", 1e-5))
        shift = p["bias"] - p["mean"] * scale
        return x * torch.tensor(channel_param(scale, c, 3), dtype=x.dtype) + torch.tensor(
            channel_param(shift, c, 3), dtype=x.dtype)
    raise ValueError(f"no torch form for {kind}")
