"""Training data: reading and checking a JSONL file of examples, line by line.

Each non-blank line is one JSON object in one of two shapes:

- completion: ``{"input": "...", "output": "..."}`` -- the prompt a client sends to
  ``/v1/completions`` and the text the adapter should continue with;
- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` --
  a conversation whose last message is the assistant answer to learn.

The whole file is read before anything else happens, and every bad line is reported with its
number in one ``DataError``. This module checks shape and types only; tokenization (and the
"too long" check) lives in ``loraplex.train.encode``. It does not touch torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loraplex.errors import InvalidRequest, NotFound

ROLES = ("system", "user", "assistant")
MAX_REPORTED = 50


@dataclass(frozen=True)
class Example:
    """One valid line: either ``prompt``/``answer`` text or a chat ``messages`` list."""

    line: int
    kind: Literal["completion", "chat"]
    prompt: str = ""
    answer: str = ""
    messages: tuple[dict[str, str], ...] = ()


@dataclass(frozen=True)
class LineError:
    """What is wrong with one line of a data file."""

    line: int
    problem: str


class DataError(InvalidRequest):
    """A data file has bad lines; ``errors`` lists each one with its line number."""

    def __init__(self, path: Path, errors: list[LineError]) -> None:
        self.path = path
        self.errors = sorted(errors, key=lambda e: e.line)
        shown = [f"  {path}:{e.line}: {e.problem}" for e in self.errors[:MAX_REPORTED]]
        if len(self.errors) > MAX_REPORTED:
            shown.append(f"  ... and {len(self.errors) - MAX_REPORTED} more bad lines")
        lines = "line" if len(self.errors) == 1 else "lines"
        super().__init__(
            f"{path}: {len(self.errors)} bad {lines}; nothing was trained. Fix them and retry:\n"
            + "\n".join(shown)
        )


@dataclass
class Dataset:
    """The valid examples of one file and the sha256 of its bytes."""

    path: Path
    sha256: str
    examples: list[Example] = field(default_factory=list)

    @property
    def kinds(self) -> set[str]:
        """The example shapes present (``completion``, ``chat``)."""
        return {e.kind for e in self.examples}


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _check_completion(obj: dict[str, Any]) -> list[str]:
    problems = []
    for key in ("input", "output"):
        if key not in obj:
            problems.append(f'missing key "{key}"')
        elif not isinstance(obj[key], str):
            problems.append(f'wrong type: "{key}" must be a string, got {_type_name(obj[key])}')
        elif not obj[key].strip():
            problems.append(f'empty {key}: "{key}" has no text')
    return problems


def _check_messages(messages: Any) -> list[str]:
    if not isinstance(messages, list):
        return [f'wrong type: "messages" must be an array, got {_type_name(messages)}']
    if not messages:
        return ['empty "messages": needs at least a user message and an assistant answer']
    problems = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            problems.append(f"wrong type: {where} must be an object, got {_type_name(msg)}")
            continue
        for key in ("role", "content"):
            if key not in msg:
                problems.append(f'missing key "{key}" in {where}')
            elif not isinstance(msg[key], str):
                got = _type_name(msg[key])
                problems.append(f"wrong type: {where}.{key} must be a string, got {got}")
        if isinstance(msg.get("role"), str) and msg["role"] not in ROLES:
            problems.append(f'{where}.role is "{msg["role"]}"; use one of {", ".join(ROLES)}')
    if problems:
        return problems
    if messages[-1]["role"] != "assistant":
        problems.append('the last message must have role "assistant" (the answer to learn)')
    elif not messages[-1]["content"].strip():
        problems.append("empty output: the last assistant message has no text")
    if not any(m["role"] == "user" for m in messages[:-1]):
        problems.append('no "user" message before the answer')
    return problems


def parse_line(number: int, raw: bytes) -> Example | LineError | None:
    """Check one raw line; ``None`` for a blank line (skipped)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return LineError(number, "not UTF-8 text")
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return LineError(number, f"not JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(obj, dict):
        return LineError(number, f"expected a JSON object, got {_type_name(obj)}")
    if "messages" in obj:
        problems = _check_messages(obj["messages"])
        if not problems:
            msgs = tuple({"role": m["role"], "content": m["content"]} for m in obj["messages"])
            return Example(number, "chat", messages=msgs)
    elif "input" in obj or "output" in obj:
        problems = _check_completion(obj)
        if not problems:
            return Example(number, "completion", prompt=obj["input"], answer=obj["output"])
    else:
        problems = ['missing keys: needs "input" and "output", or "messages"']
    return LineError(number, "; ".join(problems))


def read(path: Path) -> tuple[Dataset, list[LineError]]:
    """Read and check every line of ``path``: the valid examples and each bad line."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"Data file {path} does not exist.")
    raw = path.read_bytes()
    dataset = Dataset(path=path, sha256=hashlib.sha256(raw).hexdigest())
    errors: list[LineError] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        result = parse_line(number, line.rstrip(b"\r"))
        if isinstance(result, LineError):
            errors.append(result)
        elif result is not None:
            dataset.examples.append(result)
    return dataset, errors


def raise_if_bad(dataset: Dataset, errors: list[LineError]) -> None:
    """Raise ``DataError`` if any line is bad, ``InvalidRequest`` if there is no example."""
    if errors:
        raise DataError(dataset.path, errors)
    if not dataset.examples:
        raise InvalidRequest(f"{dataset.path} has no examples; write one JSON object per line.")


def load(path: Path) -> Dataset:
    """Read ``path`` and raise on any bad line (shape and types only; no tokenizer)."""
    dataset, errors = read(path)
    raise_if_bad(dataset, errors)
    return dataset
