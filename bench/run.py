"""`python -m bench.run [--full] [--only TOPIC ...]`: every `bench/bench_*.py`, one summary.

Each module exposes `run(full: bool = False) -> dict` and writes `bench/results/<topic>.json`
itself. This runner imports them in name order, records each one's result, wall time and any
failure (a failing topic is recorded, never aborts the rest), and writes
`bench/results/summary.json` and `bench/results/summary.md` with the machine they ran on.
Markdown tables that a topic returns under `"markdown"` go into the summary as they are.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from rewriter.report import jsonable

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"


def topics() -> list[str]:
    """Topic names of the `bench_*.py` modules present, sorted."""
    return sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))


def run_topic(topic: str, full: bool) -> dict[str, Any]:
    """Import and run one topic; never raises."""
    started = time.perf_counter()
    entry: dict[str, Any] = {"topic": topic, "module": f"bench.bench_{topic}"}
    try:
        module = importlib.import_module(entry["module"])
        result = module.run(full=full)
        entry.update(status="ok", result=jsonable(result))
    except Exception as exc:  # a broken topic must not stop the others
        entry.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                     traceback=traceback.format_exc(limit=8))
    entry["wall_s"] = round(time.perf_counter() - started, 1)
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="every matrix (slow); default: quick")
    parser.add_argument("--only", nargs="*", metavar="TOPIC", help=f"subset of {topics()}")
    args = parser.parse_args(argv)
    from rewriter.bench import machine_info

    wanted = args.only or topics()
    unknown = sorted(set(wanted) - set(topics()))
    if unknown:
        parser.error(f"unknown topics {unknown}; present: {topics()}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    entries = []
    for topic in wanted:
        print(f"[bench] {topic} ({'full' if args.full else 'quick'}) ...", flush=True)
        entry = run_topic(topic, args.full)
        status = entry["status"] if entry["status"] == "ok" else f"FAILED: {entry['error']}"
        print(f"[bench] {topic}: {status} in {entry['wall_s']} s", flush=True)
        entries.append(entry)
    if args.only:
        entries = _merge_with_previous(entries, "full" if args.full else "quick")
    summary = {
        "mode": "full" if args.full else "quick",
        "machine": machine_info(),
        "wall_s": round(time.perf_counter() - started, 1),
        "topics": entries,
    }
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (RESULTS / "summary.md").write_text(summary_markdown(summary))
    print(f"[bench] wrote {RESULTS / 'summary.json'} and summary.md", flush=True)
    return 0 if all(e["status"] == "ok" for e in entries) else 1


def _merge_with_previous(entries: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """With --only, keep the other topics of the last summary of the same mode (a partial rerun
    updates the summary instead of erasing it)."""
    path = RESULTS / "summary.json"
    if not path.exists():
        return entries
    previous = json.loads(path.read_text())
    if previous.get("mode") != mode:
        return entries
    fresh = {e["topic"]: e for e in entries}
    merged = [fresh.pop(e["topic"], e) for e in previous.get("topics", [])]
    return sorted(merged + list(fresh.values()), key=lambda e: e["topic"])


def summary_markdown(summary: dict[str, Any]) -> str:
    m = summary["machine"]
    lines = [
        f"# Benchmark summary ({summary['mode']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m.get('cores_available')} available to the "
        f"process), {m['system']}; Python {m['python']}, onnxruntime {m['onnxruntime']}, "
        f"onnx {m['onnx']}. Latency: onnxruntime CPU, graph optimisation ALL, explicit intra-op "
        "threads (stated per table), warm-up, interleaved A/B, medians.",
        "",
        "| topic | status | wall time (s) |",
        "| --- | --- | ---: |",
    ]
    for e in summary["topics"]:
        status = "ok" if e["status"] == "ok" else f"failed: {e['error'][:120]}"
        lines.append(f"| {e['topic']} | {status} | {e['wall_s']} |")
    for e in summary["topics"]:
        result = e.get("result")
        markdown = result.get("markdown") if isinstance(result, dict) else None
        if markdown:
            lines += ["", f"## {e['topic']}", "", markdown.strip()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
