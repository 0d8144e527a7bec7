"""One `key=value` grammar for every option string: pass specs, `--distill`, `--preprocess`,
output groups.

    key=value,key=value        pairs separated by ","
    key=a+b+c                  a list (shell-safe unquoted; "|" is still read, for old scripts)
    key=a,b,c                  a token without "=" continues the previous key's list

Options are declared once as dataclass fields made by `option(...)`, with their range (`ge`,
`gt`, `le`, `lt`). Numbers must be finite and, unless declared `signed` or given a lower bound,
not negative, so every pass, distillation and preprocessing get the same checks. Values come
either as text (command line) or already typed (Python API, TOML) and reach the same typed
options; typed values are never turned back into strings on the way.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from rewriter.errors import OptionError

#: The documented list separator ("+" needs no quoting in bash; "|" is a shell pipe).
LIST_SEPARATOR = "+"
_LIST_SPLIT = re.compile(r"[+|]")

T = TypeVar("T")


# ------------------------------------------------------------------------------ text grammar


def parse_pairs(text: str | None, label: str) -> dict[str, str]:
    """`a=1,b=x+y,c=1,2` -> {"a": "1", "b": "x+y", "c": "1+2"} (values still text)."""
    pairs: dict[str, str] = {}
    key: str | None = None
    for token in (t.strip() for t in (text or "").split(",")):
        if not token:
            continue
        name, sep, value = token.partition("=")
        if sep:
            key = name.strip()
            if not key:
                raise OptionError(f"{label}: {token!r} has no key (write key=value)")
            if key in pairs:
                raise OptionError(f"{label}: '{key}' given twice")
            pairs[key] = value.strip()
        elif key is None:
            raise OptionError(f"{label}: option {token!r} is not key=value")
        else:  # `mean=0.5,0.5,0.5`: a bare token continues the previous key's list
            pairs[key] = f"{pairs[key]}{LIST_SEPARATOR}{token}" if pairs[key] else token
    return pairs


def split_list(text: str) -> list[str]:
    """`a+b|c` -> ["a", "b", "c"] (empty items dropped)."""
    return [item.strip() for item in _LIST_SPLIT.split(text) if item.strip()]


def format_value(value: Any) -> str:
    """A typed value written back in the grammar (lists joined with "+")."""
    if isinstance(value, (list, tuple)):
        return LIST_SEPARATOR.join(map(str, value))
    return str(value)


def format_pairs(options: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={format_value(v)}" for k, v in options.items())


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    """` (did you mean 'hidden'?)` when a known name is close, else ``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# ------------------------------------------------------------------------------ declarations


def option(
    default: Any,
    help: str,  # noqa: A002 - mirrors argparse
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    signed: bool = False,
    **kw: Any,
) -> Any:
    """A dataclass field with help text (for `--list-passes`) and its allowed range."""
    metadata = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "signed": signed}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata=metadata, **kw
        )
    return dataclasses.field(default=default, metadata=metadata, **kw)


def option_names(cls: type) -> list[str]:
    """The option names as written (`min-channels`)."""
    return [f.name.replace("_", "-") for f in dataclasses.fields(cls)]


def parse_options(cls: type[T], raw: str | Mapping[str, Any] | None, label: str) -> T:
    """Build the options dataclass `cls` from grammar text or a mapping of text/typed values.

    Every mistake is an `OptionError` (a usage error, exit 2) naming `label` and the option.
    """
    if raw is None or isinstance(raw, str):
        raw = parse_pairs(raw, label)
    fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        field = fields.get(str(key).replace("_", "-"))
        if field is None:
            known = ", ".join(sorted(fields)) or "none"
            raise OptionError(
                f"{label}: unknown option '{key}'{did_you_mean(str(key), fields)} "
                f"(options: {known})"
            )
        shown = format_value(value) if isinstance(value, (list, tuple)) else value
        try:
            values[field.name] = coerce(value, hints[field.name])
            check_range(values[field.name], field.metadata)
        except (TypeError, ValueError) as exc:
            raise OptionError(f"{label}: option '{key}={shown}': {exc}") from None
    try:
        options = cls(**values)
    except (TypeError, ValueError) as exc:
        raise OptionError(f"{label}: {exc}") from None
    validate = getattr(options, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as exc:
            raise OptionError(f"{label}: {exc}") from None
    return options


def describe_options(cls: type) -> list[tuple[str, str, str]]:
    """(name, default, help) for each option, for `--list-passes`."""
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        rows.append((f.name.replace("_", "-"), format_value(default), f.metadata.get("help", "")))
    return rows


# ------------------------------------------------------------------------------ values


def coerce(value: Any, hint: Any) -> Any:
    """`value` (text or typed) as the type `hint` describes; TypeError/ValueError otherwise."""
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
                return coerce(value, arg)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(dict.fromkeys(errors)))
    if origin is typing.Literal:
        if value in args:
            return value
        if isinstance(value, str):
            raise ValueError(
                f"expected one of {', '.join(map(str, args))}"
                + did_you_mean(value, [str(a) for a in args])
            )
        raise ValueError(f"expected one of {', '.join(map(str, args))}")
    if origin in (list, tuple):
        if isinstance(value, str):
            items: list[Any] = split_list(value)
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ValueError(f"expected a list, not {type(value).__name__}")
        item_type = args[0] if args else str
        return [coerce(v, item_type) for v in items if v != ""]
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower() if isinstance(value, (str, int)) else None
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if hint is int:
        return _to_int(value)
    if hint is float:
        return _to_float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, not {type(value).__name__}")
        return value
    return value


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected an integer, not {_kind(value)}")
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ValueError("expected an integer") from None
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("expected an integer")
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a number, not {_kind(value)}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError("expected a number") from None
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return number


def _kind(value: Any) -> str:
    return "a boolean" if isinstance(value, bool) else f"a {type(value).__name__}"


def check_range(value: Any, meta: Mapping[str, Any]) -> None:
    """Finite, and within the declared bounds; not negative unless `signed` or bounded below."""
    items = value if isinstance(value, list) else [value]
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError("must be a finite number")
        ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
        if ge is None and gt is None and not meta.get("signed"):
            ge = 0
        if ge is not None and v < ge:
            raise ValueError(f"must be >= {ge:g}")
        if gt is not None and v <= gt:
            raise ValueError(f"must be > {gt:g}")
        if le is not None and v > le:
            raise ValueError(f"must be <= {le:g}")
        if lt is not None and v >= lt:
            raise ValueError(f"must be < {lt:g}")
