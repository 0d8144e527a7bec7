"""Pass specs and typed options: what the CLI, TOML and Python API all go through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
from rewriter.passes.base import PassOptions, option, parse_options

from rewriter.errors import PassError, UsageError
from rewriter.pipeline import PassSpec, parse_pass_spec


@dataclass
class _Opts(PassOptions):
    ratio: float = option(0.5, "r/C")
    rank: int | None = option(None, "fixed rank")
    init: Literal["svd", "refit"] = option("svd", "init")
    exclude: list[str] = option([], "globs")
    merge: bool = option(True, "merge")

    def validate(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ValueError("ratio must be in (0, 1]")


def test_parse_pass_spec_keeps_order_and_values():
    spec = parse_pass_spec("bottleneck:ratio=0.25,init=refit,exclude=head*|cls*")
    assert spec == PassSpec(
        "bottleneck", {"ratio": "0.25", "init": "refit", "exclude": "head*|cls*"}
    )
    assert str(spec) == "bottleneck:ratio=0.25,init=refit,exclude=head*|cls*"
    assert parse_pass_spec("cleanup") == PassSpec("cleanup", {})


@pytest.mark.parametrize("bad", [":ratio=1", "bottleneck:ratio", "bottleneck:=3"])
def test_malformed_pass_spec_is_a_usage_error(bad):
    with pytest.raises(UsageError):
        parse_pass_spec(bad)


def test_options_are_coerced_from_strings():
    opts = parse_options(
        _Opts,
        {"ratio": "0.25", "rank": "16", "init": "refit", "exclude": "a*|b*", "merge": "false"},
        "t",
    )
    assert (opts.ratio, opts.rank, opts.init, opts.exclude, opts.merge) == (
        0.25,
        16,
        "refit",
        ["a*", "b*"],
        False,
    )
    assert parse_options(_Opts, {"rank": "none"}, "t").rank is None


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"ratoi": "1"}, "unknown option 'ratoi'"),
        ({"init": "qr"}, "expected one of"),
        ({"rank": "1.5"}, "rank=1.5"),
        ({"ratio": "2"}, "ratio must be in"),
    ],
)
def test_bad_options_name_the_pass_and_option(raw, message):
    with pytest.raises(PassError, match=message):
        parse_options(_Opts, raw, "t")
