"""The shared pass protocol: an onnx-ir in-place pass with typed options and a report.

A pass subclasses `RewritePass`, declares `name`, an `Options` dataclass (each field's
`metadata["help"]` documents it for `rewrite --list-passes`) and implements `apply`, which
decides per candidate node (pattern, check with a named reason, rewrite) and records every
decision in `self.report`. Dead nodes and initializers are removed and shapes re-inferred after
any pass that changed the graph, so passes never clean up by hand.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import onnx_ir as ir

from rewriter.context import PassContext
from rewriter.errors import PassError
from rewriter.graph import remove_unused
from rewriter.report import PassReport
from rewriter.shapes import infer_shapes


@dataclasses.dataclass
class PassOptions:
    """Base for a pass's options; subclasses add dataclass fields with defaults."""


def option(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse
    """A dataclass field with help text for `--list-passes`."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"help": help}, **kw
        )
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


class RewritePass(ir.passes.InPlacePass):
    """Base class of every onexone pass."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Options: ClassVar[type[PassOptions]] = PassOptions
    #: True when the rewrite keeps outputs unchanged up to float rounding (checked by the guard).
    exact: ClassVar[bool] = False
    #: True when nothing may follow this pass in a pipeline (its output is not our IR's kind of
    #: graph to rewrite further, e.g. a QDQ int8 model).
    runs_last: ClassVar[bool] = False

    def __init__(
        self,
        options: PassOptions | Mapping[str, Any] | None = None,
        context: PassContext | None = None,
    ) -> None:
        super().__init__()
        self.options = (
            options
            if isinstance(options, PassOptions)
            else parse_options(self.Options, options or {}, self.name)
        )
        self.context = context or PassContext()
        self.report = PassReport(self.name, exact=self.exact)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.report = PassReport(
            self.name, options=dataclasses.asdict(self.options), exact=self.exact
        )
        self.apply(model)
        modified = self.report.n_applied > 0
        if modified:
            remove_unused(model)
            infer_shapes(model, strict=False)
        elif not self.report.decisions:
            self.report.note("nothing to do: no candidate node in this model")
        return ir.passes.PassResult(model, modified)

    def chooses_on_holdout(self) -> bool:
        """True when the pass makes a choice on the held-out split (numbers measured there are
        then optimistic, so the run measures its headline on a split no choice saw)."""
        return False

    @abstractmethod
    def apply(self, model: ir.Model) -> None:
        """Rewrite `model` in place, recording a decision for every candidate in `self.report`."""


# ------------------------------------------------------------------------------ options


def parse_options(cls: type[PassOptions], raw: Mapping[str, Any], pass_name: str) -> PassOptions:
    """Build `cls` from strings (CLI `key=value`) or typed values (Python API, TOML)."""
    fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        field = fields.get(str(key).replace("_", "-"))
        if field is None:
            known = ", ".join(sorted(fields)) or "none"
            raise PassError(f"pass '{pass_name}': unknown option '{key}' (options: {known})")
        try:
            values[field.name] = _coerce(value, hints[field.name])
        except (TypeError, ValueError) as exc:
            raise PassError(f"pass '{pass_name}': option '{key}={value}': {exc}") from None
    try:
        options = cls(**values)
    except (TypeError, ValueError) as exc:
        raise PassError(f"pass '{pass_name}': {exc}") from None
    validate = getattr(options, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as exc:
            raise PassError(f"pass '{pass_name}': {exc}") from None
    return options


def _coerce(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if origin is typing.Literal:
        if value in args or str(value) in args:
            return value if value in args else str(value)
        raise ValueError(f"expected one of {', '.join(map(str, args))}")
    if origin in (list, tuple):
        items = value.split("|") if isinstance(value, str) else list(value)
        item_type = args[0] if args else str
        return [_coerce(v, item_type) for v in items if v != ""]
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("expected an integer")
        return int(value)
    if hint is float:
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError("expected a string")
        return value
    return value


def describe_options(cls: type[PassOptions]) -> list[tuple[str, str, str]]:
    """(name, default, help) for each option, for `--list-passes`."""
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        if isinstance(default, list):
            default = "|".join(map(str, default))
        rows.append((f.name.replace("_", "-"), str(default), f.metadata.get("help", "")))
    return rows
