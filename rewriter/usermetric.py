"""The user's own metric: a function of a model path that says how good the model is for *their*
task (mAP on their validation set through their own pre- and post-processing), in the manner of
Olive's `evaluate_func`.

`--metric module:function` (an importable module) or `--metric path/to/file.py:function`. The
function takes the path of an `.onnx` file and returns a number (higher is better) or a dict
whose `primary` key names its main value, e.g. `{"primary": "map50", "map50": 0.81, "f1": 0.9}`.
The tool evaluates the original once and the rewritten model wherever a decision needs it
(`target=auto`, `--max-drop`), and reports both values and the drop.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from rewriter.errors import OnexoneError, UsageError


@dataclass(frozen=True)
class MetricValue:
    """One evaluation: the primary value (higher is better) and every value the function gave."""

    primary: float
    values: dict[str, float] = field(default_factory=dict)
    primary_name: str = "value"

    def to_dict(self) -> dict[str, Any]:
        return {"primary": self.primary_name, "value": self.primary, "values": dict(self.values)}


@dataclass
class LoadedMetric:
    """A user metric ready to call; counts its calls so reports (and tests) can show them."""

    spec: str
    function: Callable[[str], Any]
    calls: int = 0

    def evaluate(self, model_path: str | os.PathLike) -> MetricValue:
        """Call the user's function on a model file and check what it returned."""
        self.calls += 1
        try:
            raw = self.function(str(model_path))
        except Exception as exc:  # the user's code: report it in one line, never a traceback
            message = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise OnexoneError(
                f"--metric {self.spec}: raised {type(exc).__name__} on {model_path}: {message}"
            ) from None
        return _metric_value(raw, self.spec)

    def evaluate_model(self, model: ir.Model) -> MetricValue:
        """Evaluate an in-memory model (saved to a private temporary folder first)."""
        from rewriter.io import save

        with tempfile.TemporaryDirectory(prefix="onexone-metric-") as folder:
            path = save(model, Path(folder) / "model.onnx")
            return self.evaluate(path)


def load_metric(spec: str | LoadedMetric | Callable[[str], Any]) -> LoadedMetric:
    """`module:function` or `path/to/file.py:function` -> a callable metric (checked now)."""
    if isinstance(spec, LoadedMetric):
        return spec
    if callable(spec):
        return LoadedMetric(getattr(spec, "__name__", "metric"), spec)
    where, sep, name = str(spec).rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise UsageError(
            f"--metric {spec!r}: expected module:function or path/to/file.py:function"
        )
    module = _import(where, spec)
    function = getattr(module, name, None)
    if not callable(function):
        raise UsageError(f"--metric {spec}: {where} has no function '{name}'")
    return LoadedMetric(str(spec), function)


def _import(where: str, spec: str) -> Any:
    if where.endswith(".py") or os.sep in where or "/" in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise UsageError(f"--metric {spec}: no such file {path}")
        module_name = f"onexone_user_metric_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise UsageError(f"--metric {spec}: cannot import {path}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise UsageError(f"--metric {spec}: importing {path} raised {exc!r}") from None
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # `rewrite` as a console script: let ./mymetric.py import
    try:
        return importlib.import_module(where)
    except ImportError as exc:
        raise UsageError(f"--metric {spec}: cannot import module '{where}' ({exc})") from None
    except Exception as exc:
        raise UsageError(f"--metric {spec}: importing '{where}' raised {exc!r}") from None


def _metric_value(raw: Any, spec: str) -> MetricValue:
    if isinstance(raw, Mapping):
        primary = raw.get("primary")
        values = {str(k): v for k, v in raw.items() if k != "primary"}
        if isinstance(primary, str):
            if primary not in values:
                raise OnexoneError(
                    f"--metric {spec}: 'primary' names '{primary}', which the dict lacks"
                )
            name = primary
        elif primary is not None and len(values) == 0:
            name, values = "primary", {"primary": primary}
        else:
            raise OnexoneError(
                f"--metric {spec}: a dict result needs 'primary' naming its main value "
                f"(got keys {sorted(map(str, raw))})"
            )
        numbers = {k: _number(v, spec, k) for k, v in values.items() if _is_number(v)}
        return MetricValue(_number(values[name], spec, name), numbers, name)
    return MetricValue(_number(raw, spec, "value"), {"value": _number(raw, spec, "value")})


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool)


def _number(value: Any, spec: str, name: str) -> float:
    if isinstance(value, bool) or not _is_number(value):
        raise OnexoneError(f"--metric {spec}: '{name}' is {value!r}, not a number")
    number = float(value)
    if not math.isfinite(number):
        raise OnexoneError(f"--metric {spec}: '{name}' is {number}, not a finite number")
    return number


def metric_summary(
    metric: LoadedMetric, before: MetricValue, after: MetricValue | None
) -> dict[str, Any]:
    """The report's `metric` entry: both values, the drop, and how often the metric ran."""
    out: dict[str, Any] = {
        "spec": metric.spec,
        "primary": before.primary_name,
        "before": before.primary,
        "values_before": dict(before.values),
        "calls": metric.calls,
    }
    if after is not None:
        out.update(
            after=after.primary,
            values_after=dict(after.values),
            drop=before.primary - after.primary,
        )
    return out
