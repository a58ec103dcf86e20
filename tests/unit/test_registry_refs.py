"""Adapter names and references: N, N@vK, N:alias."""

from __future__ import annotations

import pytest

from loraplex.adapters import (
    AdapterRef,
    check_alias,
    check_name,
    parse_ref,
    parse_version_key,
)
from loraplex.errors import InvalidAdapter, InvalidRequest, NotFound


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sales", AdapterRef("sales", alias="stable")),
        ("sales:canary", AdapterRef("sales", alias="canary")),
        ("sales@v12", AdapterRef("sales", number=12)),
        ("a-b_9@v1", AdapterRef("a-b_9", number=1)),
    ],
)
def test_parse_ref(text: str, expected: AdapterRef) -> None:
    assert parse_ref(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Sales",
        "../etc",
        "a/b",
        "sales@1",
        "sales@v0",
        "sales@v01",
        "sales@",
        "sales:",
        "sales:Canary",
        "x" * 65,
        "sales@v1@v2",
        "sales:a:b",
        "sales\n",
        ".hidden",
    ],
)
def test_parse_ref_refuses_malformed_as_not_found(text: str) -> None:
    with pytest.raises(NotFound):
        parse_ref(text)


def test_str_round_trips() -> None:
    assert str(parse_ref("sales@v3")) == "sales@v3"
    assert str(parse_ref("sales")) == "sales:stable"


@pytest.mark.parametrize("name", ["../x", "A", "", "a b", "a/b", "a" * 65, "-a", "_a", "a.b"])
def test_check_name_refuses_anything_path_like(name: str) -> None:
    with pytest.raises(InvalidAdapter, match=r"Invalid adapter name .*\^\[a-z0-9\]"):
        check_name(name)


def test_check_name_accepts_limits() -> None:
    assert check_name("a" * 64) == "a" * 64
    assert check_name("0_a-b") == "0_a-b"


def test_exact_version_needed_for_promote_and_delete() -> None:
    assert parse_version_key("x@v2") == AdapterRef("x", number=2)
    with pytest.raises(InvalidRequest, match="names no version"):
        parse_version_key("x")
    with pytest.raises(InvalidRequest, match="is an alias"):
        parse_version_key("x:canary")


def test_alias_names() -> None:
    assert check_alias("canary") == "canary"
    for bad in ("", "Stable", "1st", "a/b", "a" * 33):
        with pytest.raises(InvalidRequest, match="Invalid alias"):
            check_alias(bad)
