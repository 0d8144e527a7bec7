"""The one `key=value` grammar (`rewriter.options`) and the typed, range-checked options."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import pytest

from rewriter.errors import OptionError, UsageError
from rewriter.options import (
    describe_options,
    format_pairs,
    option,
    parse_options,
    parse_pairs,
    split_list,
)


@dataclass
class _Opts:
    ratio: float | None = option(None, "share", gt=0, lt=1)
    steps: int = option(3, "count", ge=1)
    init: Literal["svd", "refit"] = option("svd", "init")
    names: list[str] = option([], "globs")
    offset: float = option(0.0, "may be negative", signed=True)
    flag: bool = option(True, "switch")


def test_pairs_lists_use_plus_and_keep_pipe_and_comma_continuation():
    assert parse_pairs("a=1,b=x+y", "t") == {"a": "1", "b": "x+y"}
    assert parse_pairs("mean=0.5,0.4,0.3,std=1", "t") == {"mean": "0.5+0.4+0.3", "std": "1"}
    assert split_list("a*+b*|c") == ["a*", "b*", "c"]
    assert format_pairs({"exclude": ["a", "b"], "ratio": 0.5}) == "exclude=a+b,ratio=0.5"
    with pytest.raises(OptionError, match="not key=value"):
        parse_pairs("steps", "t")
    with pytest.raises(OptionError, match="given twice"):
        parse_pairs("a=1,a=2", "t")
    with pytest.raises(OptionError, match="no key"):
        parse_pairs("=3", "t")


def test_text_and_typed_values_reach_the_same_options():
    from_text = parse_options(_Opts, "ratio=0.25,steps=4,init=refit,names=a+b,flag=off", "t")
    typed = parse_options(
        _Opts, {"ratio": 0.25, "steps": 4, "init": "refit", "names": ["a", "b"], "flag": False},
        "t",
    )
    assert from_text == typed
    assert from_text.names == ["a", "b"] and from_text.flag is False
    assert parse_options(_Opts, {"steps": 4.0}, "t").steps == 4  # TOML 4.0 is an integer
    assert parse_options(_Opts, "offset=-2", "t").offset == -2.0


@pytest.mark.parametrize(
    "raw, message",
    [
        ("stesp=3", "unknown option 'stesp' (did you mean 'steps'?)"),
        ("init=refti", "did you mean 'refit'"),
        ("ratio=nan", "finite"),
        ("ratio=inf", "finite"),
        ("ratio=1.5", "must be < 1"),
        ("steps=0", "must be >= 1"),
        ("steps=2.5", "integer"),
        ("flag=maybe", "true or false"),
        ({"steps": ["a"]}, "expected an integer, not a list"),
        ({"steps": True}, "not a boolean"),
        ({"names": 3}, "expected a list"),
        ({"init": 3}, "expected one of"),
    ],
)
def test_mistakes_are_usage_errors_naming_the_option(raw, message):
    with pytest.raises(OptionError, match=re.escape(message)) as exc:
        parse_options(_Opts, raw, "pass 't'")
    assert str(exc.value).startswith("pass 't':")
    assert isinstance(exc.value, UsageError) and exc.value.exit_code == 2


def test_numbers_are_non_negative_unless_declared_signed():
    @dataclass
    class Plain:
        ridge: float = option(0.1, "ridge")

    with pytest.raises(OptionError, match="must be >= 0"):
        parse_options(Plain, "ridge=-1", "x")
    assert parse_options(Plain, "ridge=0", "x").ridge == 0.0
    rows = {name: default for name, default, _ in describe_options(_Opts)}
    assert rows["names"] == "" and rows["steps"] == "3"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("bottleneck:shrink=nan", "finite"),
        ("bottleneck:shrink=-5", ">= 0"),
        ("bottleneck:ridge=-1", ">= 0"),
        ("bottleneck:ridge=nan", "finite"),
        ("bottleneck:min-channels=-5", ">= 0"),
        ("bottleneck:max-positions=0", ">= 1"),
        ("dense-head:hiden=0", "did you mean 'hidden'"),
    ],
)
def test_every_real_pass_gets_the_range_checks(spec, message):
    from rewriter.passes import get_pass

    from rewriter.pipeline import parse_pass_spec

    parsed = parse_pass_spec(spec)
    with pytest.raises(OptionError, match=message):
        get_pass(parsed.name).parse(parsed.options)


def test_distill_and_preprocess_share_the_grammar():
    from rewriter.distill import parse_distill_options
    from rewriter.images import parse_preprocess

    assert parse_distill_options("train=new+conv*,lr=0.01").train == ["new", "conv*"]
    with pytest.raises(OptionError, match="finite"):
        parse_distill_options("lr=nan")
    with pytest.raises(OptionError, match="did you mean 'steps'"):
        parse_distill_options("step=3")
    p = parse_preprocess("size=224,mean=0.485+0.456+0.406,std=0.229|0.224|0.225,layout=nhwc")
    assert p.size == (224, 224) and p.mean == [0.485, 0.456, 0.406] and p.layout == "NHWC"
    assert parse_preprocess("size=12x16").size == (12, 16)
    assert parse_preprocess({"size": 8, "mean": [0.5], "limit": 3}).limit == 3
    assert math.isclose(parse_preprocess("scale=1").scale, 1.0)
    for bad, message in (("sise=3", "did you mean 'size'"), ("limit=0", ">= 1"),
                         ("std=0", "> 0"), ("size=1+2+3", "H\\+W")):
        with pytest.raises(OptionError, match=message):
            parse_preprocess(bad)
