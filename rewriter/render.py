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
        console.print(_fidelity_line(report.fidelity))
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


def _fidelity_line(f: dict[str, Any]) -> str:
    where = f.get("dataset") or "held-out calibration samples"
    parts = [
        f"fidelity on {f.get('samples', '?')} samples ({where}): cosine {f['cosine']:.5f}",
        f"rel L2 {f['rel_l2']:.4f}",
        f"SQNR {f['sqnr_db']:.1f} dB",
    ]
    if "top1_agreement" in f:
        parts.append(f"top-1 agreement {f['top1_agreement']:.2%}")
    if "accuracy_before" in f:
        parts.append(f"accuracy {f['accuracy_before']:.2%} -> {f['accuracy_after']:.2%}")
    return ", ".join(parts)


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
        lines += [_fidelity_line(report.fidelity), ""]
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
