"""Human-readable renderings: rich tables on the terminal, Markdown for report files."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from rewriter.analyze import Analysis
    from rewriter.report import RunReport


def human(n: int | float | None) -> str:
    """1234567 -> '1.23M' (counts in tables; JSON keeps the integers)."""
    if n is None:
        return "?"
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _shape(s: Any) -> str:
    return "x".join(map(str, s)) if s else "?"


def print_analysis(analysis: Analysis, console: Console, limit: int = 40) -> None:
    table = Table(title="Per-layer cost (largest first; * = bottleneck candidate at ratio 0.5)")
    for col in (
        "",
        "node",
        "op",
        "input",
        "output",
        "kernel",
        "MACs",
        "share",
        "params",
        "after 1x1",
    ):
        table.add_column(
            col, justify="right" if col in ("MACs", "share", "params", "after 1x1") else "left"
        )
    for row in analysis.rows[:limit]:
        table.add_row(
            "*" if row.candidate else "",
            row.node,
            row.op,
            _shape(row.input_shape),
            _shape(row.output_shape),
            _shape(row.kernel) if row.kernel else "",
            human(row.macs),
            f"{row.share:.1%}",
            human(row.params),
            f"{human(row.macs_after)} (r={row.rank})" if row.candidate else "",
        )
    console.print(table)
    if len(analysis.rows) > limit:
        console.print(f"... {len(analysis.rows) - limit} more layers (use --json for all)")
    saving = analysis.candidate_saving
    console.print(
        f"total: {human(analysis.total_macs)} MACs, {human(analysis.total_params)} params; "
        f"bottleneck candidates could save {human(saving)} MACs "
        f"({saving / max(analysis.total_macs, 1):.1%}) at ratio 0.5"
    )
    if analysis.unknown:
        console.print(
            f"[yellow]MACs unknown for {len(analysis.unknown)} nodes with dynamic shapes "
            "(fix them with --input-shape)[/yellow]"
        )


def print_run_report(report: RunReport, console: Console, limit: int = 30) -> None:
    for p in report.passes:
        if not p.decisions:
            console.print(f"pass {p.name}: " + ("; ".join(p.notes) or "no candidates"))
            continue
        table = Table(
            title=f"pass {p.name}: {p.n_applied} applied, {len(p.decisions) - p.n_applied} skipped"
        )
        for col in ("node", "op", "decision", "reason", "MACs before", "MACs after"):
            table.add_column(col)
        for d in p.decisions[:limit]:
            table.add_row(
                d.node,
                d.op,
                "applied" if d.applied else "skipped",
                d.reason,
                human(d.macs_before),
                human(d.macs_after),
            )
        console.print(table)
        if len(p.decisions) > limit:
            console.print(f"... {len(p.decisions) - limit} more decisions (see --report)")
        for note in p.notes:
            console.print(f"  note: {note}")
    console.print(_totals_line(report))
    if report.fidelity:
        for line in fidelity_lines(report.fidelity):
            console.print(line)
    if report.metric:
        console.print(metric_line(report.metric))
    if report.latency:
        console.print(_latency_line(report.latency))
    for gate in report.gates:
        status = "[green]pass[/green]" if gate.get("passed") else "[red]FAIL[/red]"
        console.print(f"gate {gate['name']}: {status} ({gate.get('detail', '')})")
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")


def _totals_line(report: RunReport) -> str:
    def pct(a: int, b: int) -> str:
        return f"{(1 - b / a):+.1%}".replace("+", "-") if a else "n/a"

    return (
        f"MACs {human(report.macs_before)} -> {human(report.macs_after)} "
        f"({pct(report.macs_before, report.macs_after)}), params {human(report.params_before)} -> "
        f"{human(report.params_after)} ({pct(report.params_before, report.params_after)})"
    )


def fidelity_lines(f: dict[str, Any]) -> list[str]:
    """Headline (the worst output group, named), then one line per group; whole-tensor numbers
    stay in the JSON."""
    where = f.get("dataset") or "held-out calibration samples"
    worst = f.get("worst") or {}
    head = f"fidelity on {f.get('samples', '?')} samples ({where})"
    if worst:
        head += f": worst group {worst['group']}, {_group_numbers(worst)}"
    parts = [head]
    if "top1_agreement" in f:
        parts.append(f"top-1 agreement {f['top1_agreement']:.2%}")
    if "accuracy_before" in f:
        parts.append(f"accuracy {f['accuracy_before']:.2%} -> {f['accuracy_after']:.2%}")
    lines = [", ".join(parts)]
    groups = f.get("groups") or {}
    if len(groups) > 1:
        for label, g in groups.items():
            lines.append(f"  group {label} (rows {g['rows']}, {g['kind']}): {_group_numbers(g)}")
    return lines


def _group_numbers(g: dict[str, Any]) -> str:
    sqnr = "inf" if g.get("sqnr_db") is None else f"{g['sqnr_db']:.1f}"
    parts = [f"cosine {g['cosine']:.5f}", f"rel L2 {g['rel_l2']:.4f}", f"SQNR {sqnr} dB"]
    if g.get("kind") == "score":
        parts.append(f"max abs {g['max_abs']:.3g}")
        for t in ("0.25", "0.5"):
            if f"flip@{t}" in g:
                parts.append(f"flip@{t} {g[f'flip@{t}']:.2%} of {g[f'decisions@{t}']}")
    parts.append(f"task error {g['task_error']:.4g}")
    return ", ".join(parts)


def metric_line(m: dict[str, Any]) -> str:
    """The user's metric: both values and the drop of its primary value."""
    line = f"metric {m['spec']} ({m['primary']}): original {m['before']:.4f}"
    if "after" in m:
        line += f" -> rewritten {m['after']:.4f} (drop {m['drop']:+.4f})"
    return line + f", {m['calls']} evaluation(s)"


def _latency_line(lat: dict[str, Any]) -> str:
    return (
        f"latency (threads {lat.get('threads')}, batch {lat.get('batch')}): "
        f"{lat['original_ms']['median']:.3f} ms -> {lat['rewritten_ms']['median']:.3f} ms, "
        f"speedup {lat['speedup']['median']:.2f}x"
    )


def run_report_markdown(report: RunReport) -> str:
    """The report as Markdown (for `--report out.md` and CI summaries)."""
    lines = [f"# onexone report: {report.model or 'model'}", "", _totals_line(report), ""]
    if report.fidelity:
        lines += [f"- {line.strip()}" for line in fidelity_lines(report.fidelity)] + [""]
    if report.metric:
        lines += [metric_line(report.metric), ""]
    if report.latency:
        lines += [_latency_line(report.latency), ""]
    for gate in report.gates:
        lines.append(
            f"- gate `{gate['name']}`: {'pass' if gate.get('passed') else 'FAIL'} "
            f"({gate.get('detail', '')})"
        )
    for p in report.passes:
        lines += ["", f"## pass `{p.name}`", "", f"options: `{p.options}`", ""]
        lines += [
            "| node | op | decision | reason | MACs before | MACs after |",
            "| --- | --- | --- | --- | ---: | ---: |",
        ]
        for d in p.decisions:
            lines.append(
                f"| {d.node} | {d.op} | {'applied' if d.applied else 'skipped'} | "
                f"{d.reason} | {d.macs_before if d.macs_before is not None else ''} | "
                f"{d.macs_after if d.macs_after is not None else ''} |"
            )
        for note in p.notes:
            lines.append(f"\n- note: {note}")
    for w in report.warnings:
        lines.append(f"\n- warning: {w}")
    return "\n".join(lines) + "\n"
