"""Markdown tables for the benchmark summary (`bench/results/summary.md` and the README)."""

from __future__ import annotations

from typing import Any


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.2%}"


def bottleneck_markdown(out: dict[str, Any]) -> str:
    lines = ["Zoo models (random weights), svd init, onnxruntime CPU, A/B interleaved:", "",
             "| model | mode | ratio | objective | threads | batch | MAC reduction | speedup "
             "(p10-p90) | efficiency |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in out.get("zoo", []):
        for lat in row.get("latency", []):
            lines.append(
                f"| {row['model']} | {row['mode']} | {row['ratio']} | "
                f"{row.get('objective', 'macs')} | {lat['threads']} | {lat['batch']} | "
                f"{row['mac_reduction']:.2f}x | "
                f"{lat['speedup']:.2f}x ({lat['speedup_p10']:.2f}-{lat['speedup_p90']:.2f}) | "
                f"{lat['efficiency']:.2f} |")
    lines += ["", "Trained digits CNN (540 test images, original 99.63%), by init and MAC target:",
              "", "| init | target | MACs removed | test accuracy | top-1 agreement | rel L2 |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in out.get("digits", []):
        lines.append(f"| {row['init']} | {row['target']} | {_pct(row['macs_removed'])} | "
                     f"{_pct(row['accuracy_after'])} | {_pct(row['top1_agreement'])} | "
                     f"{row['rel_l2']:.3f} |")
    methods = [r for r in out.get("methods", []) if "skipped" not in r]
    if methods:
        lines += ["", "`bottleneck` alone vs `method=auto` (per layer in / in-out / spatial):", "",
                  "| model | options | MACs removed | test accuracy | held-out cosine | methods "
                  "| sessions | rewrite s |",
                  "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |"]
        for r in methods:
            acc = _pct(r["accuracy_after"]) if "accuracy_after" in r else "-"
            used = ", ".join(f"{k} {v}" for k, v in r["methods"].items())
            lines.append(f"| {r['model']} | `{r['options']}` | {_pct(r['macs_removed'])} | {acc} | "
                         f"{r['cosine']:.5f} | {used} | {r['sessions']} | {r['rewrite_s']} |")
    return "\n".join(lines)


def dense_head_markdown(out: dict[str, Any]) -> str:
    lines = ["| model | options | kind | head params before → after | accuracy before → after |",
             "| --- | --- | --- | ---: | ---: |"]
    for row in out.get("digits", []):
        lines.append(f"| digits CNN | `{row['options']}` | {row['kind']} | "
                     f"{row['head_params_before']:,} → {row['head_params_after']:,} | "
                     f"{_pct(row['test_accuracy_before'])} → {_pct(row['test_accuracy_after'])} |")
    for key in ("convnet", "exact"):
        row = out.get(key)
        if isinstance(row, dict) and "head_params_before" in row:
            extra = (f"max rel error {row['max_rel_error']:.1e}" if "max_rel_error" in row
                     else "random weights")
            lines.append(f"| {row['model']} | default | {', '.join(row.get('kinds', []))} | "
                         f"{row['head_params_before']:,} → {row['head_params_after']:,} | "
                         f"{extra} |")
    return "\n".join(lines)


def supporting_markdown(out: dict[str, Any]) -> str:
    lines = ["| check | result |", "| --- | --- |"]
    for row in out.get("fold_bn", []):
        lines.append(f"| fold-bn {row['model']}: {row['folded']}/{row['bn_nodes']} BN folded | "
                     f"max rel error {row['max_rel_error']:.1e} (onnxruntime's own fusion "
                     f"{row['ort_own_fusion_max_rel_error']:.1e}) |")
    for row in out.get("executor_vs_onnxruntime", []):
        lines.append(f"| torch executor vs onnxruntime, {row['model']} | "
                     f"max rel error {row['max_rel_error']:.1e} |")
    distill = out.get("digits_bottleneck_distill") or {}
    for row in distill.get("rows", []):
        after = (row.get("distill") or {}).get("accuracy_after", row.get("accuracy_distilled"))
        lines.append(f"| digits {' → '.join(row['passes'])} ({row['mac_reduction']:.1%} MACs "
                     f"removed) then distill | accuracy {_pct(row['accuracy_original'])} → "
                     f"{_pct(row['accuracy_bottleneck'])} → {_pct(after) or '?'} |")
    return "\n".join(lines)
