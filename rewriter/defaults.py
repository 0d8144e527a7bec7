"""Defaults of the `rewrite` command as data: the parser and the `--config` reader both read them.

The config reader needs to know which flags the command line left at their defaults (a flag given
on the command line wins over the file); it imports this table instead of building the parser.
"""

from __future__ import annotations

from typing import Any

#: argparse destination -> default value.
CLI_DEFAULTS: dict[str, Any] = {
    "model": None,
    "passes": [],
    "output": None,
    "config": None,
    "calib": None,
    "eval": None,
    "preprocess": None,
    "input_shape": [],
    "report": [],
    "dry_run": False,
    "analyze": False,
    "json": False,
    "list_passes": False,
    "report_schema": False,
    "distill": None,
    "seed": 0,
    "holdout": 0.25,
    "max_drop": None,
    "min_cosine": None,
    "min_speedup": None,
    "keep_failed": False,
    "bench": False,
    "threads": 1,
    "batch": [],
    "plot": None,
    "quiet": False,
    "groups": [],
    "metric": None,
    "max_flip": None,
    "min_samples": None,
}

#: Report files by suffix.
REPORT_SUFFIXES = (".json", ".md")


def default(dest: str) -> Any:
    """A fresh copy of the default (lists are not shared between parses)."""
    value = CLI_DEFAULTS.get(dest)
    return list(value) if isinstance(value, list) else value
