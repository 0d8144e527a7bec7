"""`rewrite MODEL --config pipeline.toml`: the same run as the flags, kept in a file for CI.

```toml
model = "model.onnx"            # optional when MODEL is given on the command line
output = "model.rewritten.onnx"
input_shape = { input = [1, 3, 224, 224] }
seed = 0

[[pass]]                        # repeatable, runs in order
name = "bottleneck"
ratio = 0.25                    # pass options, typed (lists are TOML arrays)
init = "whitened"

[calibration]
data = "calib.npz"              # .npz, .npy, an image folder, or "random"
eval = "test.npz"               # optional: measure fidelity here instead of the held-out split
preprocess = "size=224,mean=0.485,0.456,0.406,std=0.229,0.224,0.225"
holdout = 0.25
min_samples = 16                # fewest held-out samples target=auto may choose on

[gates]
max_drop = 0.01                 # with [metric]: max drop of its primary value
min_cosine = 0.99
max_flip = 0.02
min_speedup = 1.1
keep_failed = false

[groups]                        # optional: output groups (default: found automatically)
output0 = "box=0-3+cls=4-13"    # or at the top: groups = "output0:box=0-3+cls=4-13"

[metric]                        # optional: your own metric, a function of a model path
function = "my_metric.py:evaluate"

[bench]
enabled = true
threads = 1
batch = [1, 8]

[outputs]
report = ["report.json", "report.md"]
plot = "report.png"
```

Relative paths are relative to the config file's folder. A flag given on the command line wins
over the file (`--pass` flags replace the file's passes). Unknown keys are errors, not ignored.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rewriter.errors import OnexoneError, UsageError

PATH_KEYS = {"model", "output", "calib", "eval", "plot"}


def load_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file (tomllib on 3.11+, tomli on 3.10)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        try:
            import tomli as tomllib
        except ImportError:
            raise UsageError("--config needs Python 3.11+ or the 'tomli' package") from None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OnexoneError(f"--config {path}: cannot read ({exc.strerror or exc})") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config {path}: invalid TOML ({exc})") from None


def config_to_flags(config: Mapping[str, Any], base: Path, label: str) -> dict[str, Any]:
    """The config as argparse destinations (`passes`, `calib`, `max_drop`, ...)."""
    flags: dict[str, Any] = {}
    sections: dict[str, Callable[[Any, str], None]] = {}

    def take(table: Mapping[str, Any], where: str, keys: Mapping[str, tuple[str, type | tuple]]):
        for key, value in table.items():
            if key not in keys:
                raise UsageError(
                    f"{label}: unknown key '{where}{key}' (known: {', '.join(sorted(keys))})"
                )
            dest, kind = keys[key]
            flags[dest] = _check_type(value, kind, f"{label}: '{where}{key}'")

    top = {k: v for k, v in config.items()
           if not isinstance(v, (dict, list)) or k == "input_shape"
           or (k == "groups" and isinstance(v, list))}
    take(top, "", {"model": ("model", str), "output": ("output", str), "seed": ("seed", int),
                   "input_shape": ("input_shape", (dict, list, str)),
                   "groups": ("groups", (str, list)), "metric": ("metric", str)})
    sections["pass"] = lambda v, w: flags.__setitem__("passes", _passes(v, label))
    sections["calibration"] = lambda v, w: take(v, w, {
        "data": ("calib", str), "eval": ("eval", str), "preprocess": ("preprocess", (str, dict)),
        "holdout": ("holdout", (float, int)), "min_samples": ("min_samples", int)})
    sections["gates"] = lambda v, w: take(v, w, {
        "max_drop": ("max_drop", (float, int)), "min_cosine": ("min_cosine", (float, int)),
        "min_speedup": ("min_speedup", (float, int)), "keep_failed": ("keep_failed", bool),
        "max_flip": ("max_flip", (float, int))})
    sections["groups"] = lambda v, w: flags.__setitem__("groups", _groups_table(v, label))
    sections["metric"] = lambda v, w: take(v, w, {"function": ("metric", str)})
    sections["bench"] = lambda v, w: take(v, w, {
        "enabled": ("bench", bool), "threads": ("threads", int), "batch": ("batch", (list, int))})
    sections["outputs"] = lambda v, w: take(v, w, {
        "model": ("output", str), "report": ("report", (list, str)), "plot": ("plot", str)})
    for key, value in config.items():
        if key in top:
            continue
        if key not in sections:
            raise UsageError(
                f"{label}: unknown table '{key}' (known: {', '.join(sorted(sections))})"
            )
        if key != "pass" and not isinstance(value, dict):
            raise UsageError(f"{label}: '{key}' must be a table ([{key}])")
        sections[key](value, f"{key}.")
    return _normalize(flags, base)


def apply_config(args: argparse.Namespace, path: Path) -> argparse.Namespace:
    """Fill `args` from the config file where the command line left the default."""
    path = Path(path)
    flags = config_to_flags(load_toml(path), path.resolve().parent, f"--config {path}")
    from rewriter.cli import build_parser

    defaults = build_parser().parse_args([])
    for dest, value in flags.items():
        if getattr(args, dest, None) == getattr(defaults, dest, None):
            setattr(args, dest, value)
    return args


def _groups_table(value: Any, label: str) -> list[str]:
    """`[groups]` `output0 = "box=0-3+cls=4-13"` -> `["output0:box=0-3+cls=4-13"]`."""
    out = []
    for output, spec in value.items():
        if not isinstance(spec, str):
            raise UsageError(
                f"{label}: 'groups.{output}' must be a string like \"box=0-3+cls=4-13\""
            )
        out.append(f"{output}:{spec}")
    return out


def _passes(value: Any, label: str) -> list[dict[str, Any]]:
    entries = value if isinstance(value, list) else [value]
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise UsageError(f"{label}: pass entry {i + 1} needs a name ([[pass]] name = \"...\")")
        out.append(dict(entry))
    return out


def _normalize(flags: dict[str, Any], base: Path) -> dict[str, Any]:
    """Config values in the exact form the flags produce, paths made relative to `base`."""
    for key in PATH_KEYS & flags.keys():
        flags[key] = _resolve(flags[key], base)
    if "report" in flags:
        reports = flags["report"] if isinstance(flags["report"], list) else [flags["report"]]
        flags["report"] = [_resolve(str(r), base) for r in reports]
    if "batch" in flags:
        batches = flags["batch"] if isinstance(flags["batch"], list) else [flags["batch"]]
        flags["batch"] = [int(b) for b in batches]
    if isinstance(flags.get("preprocess"), dict):
        flags["preprocess"] = ",".join(
            f"{k}={'|'.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in flags["preprocess"].items()
        )
    if "input_shape" in flags:
        shapes = flags["input_shape"]
        if isinstance(shapes, dict):
            shapes = [f"{k}:{','.join(map(str, v))}" for k, v in shapes.items()]
        flags["input_shape"] = [shapes] if isinstance(shapes, str) else list(shapes)
    if isinstance(flags.get("groups"), str):
        flags["groups"] = [flags["groups"]]
    if "metric" in flags:
        where, sep, name = flags["metric"].rpartition(":")
        if sep and (where.endswith(".py") or "/" in where):
            flags["metric"] = f"{_resolve(where, base)}:{name}"
    for key in ("max_drop", "min_cosine", "min_speedup", "holdout", "max_flip"):
        if key in flags:
            flags[key] = float(flags[key])
    return flags


def _resolve(value: str, base: Path) -> str:
    if value == "random":
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def _check_type(value: Any, kind: type | tuple, where: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise UsageError(f"{where} must be {' or '.join(k.__name__ for k in kinds)}, not a boolean")
    if not isinstance(value, kinds):
        raise UsageError(
            f"{where} must be {' or '.join(k.__name__ for k in kinds)}, not {type(value).__name__}"
        )
    return value
