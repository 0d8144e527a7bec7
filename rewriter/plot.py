"""`--plot out.png`: per-layer MACs before/after and the latency A/B, in one picture.

matplotlib is optional (the `plot` extra); without it `--plot` fails with a message saying so.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from rewriter.errors import OnexoneError
from rewriter.report import RunReport

TOP_LAYERS = 20


def layer_macs(
    original: ir.Model, rewritten: ir.Model, shapes: Mapping[str, Sequence[int]] | None = None
) -> list[tuple[str, int, int]]:
    """(layer, MACs before, MACs after) for the original's costliest layers.

    A rewritten layer's cost is its own plus that of new nodes named after it (a pass names
    the 1x1 it inserts `<layer>_...`), so a factorised conv shows as one bar pair.
    """
    from rewriter.cost import model_cost
    from rewriter.shapes import with_input_shapes

    before = model_cost(with_input_shapes(original, shapes or {})).nodes
    after = model_cost(with_input_shapes(rewritten, shapes or {})).nodes
    names_before = {c.name for c in before}
    grouped: dict[str, int] = {}
    for c in after:
        owner = c.name if c.name in names_before else _owner(c.name, names_before)
        if owner is not None:
            grouped[owner] = grouped.get(owner, 0) + (c.macs or 0)
    rows = [(c.name, c.macs or 0, grouped.get(c.name, 0)) for c in before if c.macs]
    rows.sort(key=lambda r: -r[1])
    return rows[:TOP_LAYERS]


def _owner(name: str, candidates: set[str]) -> str | None:
    """The longest original node name that `name` extends (`conv3_reduce` -> `conv3`)."""
    best = None
    for c in candidates:
        if c and name.startswith(c) and (best is None or len(c) > len(best)):
            best = c
    return best


def render_plot(
    report: RunReport,
    original: ir.Model,
    rewritten: ir.Model,
    shapes: Mapping[str, Sequence[int]] | None,
) -> bytes:
    """The PNG's bytes (so a caller can write it atomically, with the other outputs)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OnexoneError(
            "--plot needs matplotlib: pip install 'onexone[plot]' (or pip install matplotlib)"
        ) from None
    rows = layer_macs(original, rewritten, shapes)
    fig, (ax_macs, ax_lat) = plt.subplots(
        1, 2, figsize=(13, max(4.0, 0.32 * len(rows) + 1.5)), gridspec_kw={"width_ratios": [3, 1]}
    )
    _macs_panel(ax_macs, rows, report)
    _latency_panel(ax_lat, report.latency)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_plot(
    report: RunReport,
    original: ir.Model,
    rewritten: ir.Model,
    shapes: Mapping[str, Sequence[int]] | None,
    path: Path,
) -> Path:
    """Write the PNG atomically (never a partial file); a clear error without matplotlib."""
    from rewriter.atomic import write_bytes_atomic

    data = render_plot(report, original, rewritten, shapes)
    return write_bytes_atomic(Path(path), data, label=f"--plot {path}")


def _macs_panel(ax: Any, rows: list[tuple[str, int, int]], report: RunReport) -> None:
    import numpy as np

    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r[1] / 1e6 for r in rows], height=0.4, label="before", color="#999999")
    ax.barh(y + 0.2, [r[2] / 1e6 for r in rows], height=0.4, label="after", color="#1f77b4")
    ax.set_yticks(y, [r[0][-40:] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("MMACs (per sample)")
    total_b, total_a = report.macs_before, report.macs_after
    change = f"{1 - total_a / total_b:.1%} fewer" if total_b else "n/a"
    ax.set_title(f"per-layer MACs, top {len(rows)}: total {total_b / 1e6:.1f}M -> "
                 f"{total_a / 1e6:.1f}M ({change})", fontsize=9)
    ax.legend(fontsize=8)


def _latency_panel(ax: Any, latency: dict[str, Any] | None) -> None:
    if not latency:
        ax.axis("off")
        ax.text(0.5, 0.5, "latency not measured\n(run with --bench)", ha="center", va="center")
        return
    entries = latency.get("batches") or [latency]
    labels, medians, lows, highs, colors = [], [], [], [], []
    for e in entries:
        for key, name, color in (("original_ms", "orig", "#999999"),
                                 ("rewritten_ms", "new", "#1f77b4")):
            stats = e[key]
            labels.append(f"{name}\nb={e['batch']}")
            medians.append(stats["median"])
            lows.append(stats["median"] - stats.get("p10", stats["median"]))
            highs.append(stats["p90"] - stats["median"])
            colors.append(color)
    ax.bar(range(len(medians)), medians, yerr=[lows, highs], color=colors, capsize=3)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("ms (median, p10-p90)")
    ax.set_title(f"latency, {latency.get('threads')} thread(s): "
                 f"{latency['speedup']['median']:.2f}x", fontsize=9)
