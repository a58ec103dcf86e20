"""Unit tests of training-data checks: every bad line is reported with its number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.errors import InvalidRequest, NotFound
from loraplex.train.data import DataError, load, parse_line, read

GOOD_CHAT = {
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
}


def write(tmp_path: Path, lines: list[str | bytes]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines))
    return path


def test_good_file_of_both_shapes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [json.dumps({"input": "2+2=", "output": "4"}), "", json.dumps(GOOD_CHAT), "   "],
    )
    dataset = load(path)
    assert [e.line for e in dataset.examples] == [1, 3]
    assert dataset.kinds == {"completion", "chat"}
    assert dataset.examples[0].prompt == "2+2=" and dataset.examples[0].answer == "4"
    assert dataset.examples[1].messages[-1] == {"role": "assistant", "content": "yo"}
    assert len(dataset.sha256) == 64


BAD_LINES = [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object, got array"),
    (json.dumps({"prompt": "x"}), "missing keys"),
    (json.dumps({"input": "x"}), 'missing key "output"'),
    (json.dumps({"output": "x"}), 'missing key "input"'),
    (json.dumps({"input": "x", "output": ""}), "empty output"),
    (json.dumps({"input": "x", "output": "   "}), "empty output"),
    (json.dumps({"input": "x", "output": 5}), '"output" must be a string, got number'),
    (json.dumps({"input": ["x"], "output": "y"}), '"input" must be a string, got array'),
    (json.dumps({"input": "", "output": "y"}), "empty input"),
    (json.dumps({"messages": "hi"}), '"messages" must be an array, got string'),
    (json.dumps({"messages": []}), 'empty "messages"'),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), 'role "assistant"'),
    (
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}),
        'missing key "content" in messages[1]',
    ),
    (
        json.dumps(
            {"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}
        ),
        'messages[0].role is "bot"',
    ),
    (
        json.dumps(
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}
        ),
        "messages[0].content must be a string, got number",
    ),
    (
        json.dumps(
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}
        ),
        "empty output",
    ),
    (json.dumps({"messages": [{"role": "assistant", "content": "a"}]}), 'no "user" message'),
    (json.dumps({"messages": ["hi", GOOD_CHAT["messages"][1]]}), "messages[0] must be an object"),
]


@pytest.mark.parametrize(("line", "problem"), BAD_LINES)
def test_each_bad_line_is_named(line: str, problem: str) -> None:
    result = parse_line(7, line.encode())
    assert not hasattr(result, "kind"), result
    assert result.line == 7
    assert problem in result.problem


def test_all_bad_lines_reported_with_numbers(tmp_path: Path) -> None:
    good = json.dumps(GOOD_CHAT)
    lines: list[str | bytes] = [good]
    for bad, _ in BAD_LINES:
        lines += [bad, good]
    lines.append(b"\xff\xfe not utf-8")
    path = write(tmp_path, lines)
    with pytest.raises(DataError) as info:
        load(path)
    expected = [2 + 2 * i for i in range(len(BAD_LINES))] + [len(lines)]
    assert [e.line for e in info.value.errors] == expected
    assert "not UTF-8" in info.value.errors[-1].problem
    assert f"{len(expected)} bad lines; nothing was trained" in info.value.message
    assert f"{path}:2: not JSON" in info.value.message


def test_read_returns_good_and_bad_separately(tmp_path: Path) -> None:
    path = write(tmp_path, [json.dumps(GOOD_CHAT), "oops"])
    dataset, errors = read(path)
    assert len(dataset.examples) == 1 and [e.line for e in errors] == [2]


def test_long_report_is_capped(tmp_path: Path) -> None:
    path = write(tmp_path, ["x"] * 80)
    with pytest.raises(DataError) as info:
        load(path)
    assert len(info.value.errors) == 80
    assert "and 30 more bad lines" in info.value.message


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="no examples"):
        load(write(tmp_path, ["", "  "]))
    with pytest.raises(NotFound):
        load(tmp_path / "absent.jsonl")
