"""Results of the client and the parsing of response bodies and server-sent events.

``Completion`` is what a call returns (text plus what served it and whether it fell back);
``Chunk`` is one streamed piece; ``StreamAccumulator`` turns server-sent events into chunks
and reassembles them. Only the first choice (``n=1``) is read. Requests are built in
``loraplex.client.core``; no I/O happens here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from loraplex.client.errors import error_from_body, status_for_code

Kind = Literal["completion", "chat"]
DONE = "[DONE]"


@dataclass
class Completion:
    """One finished completion or chat completion."""

    text: str
    """The generated text (chat: the assistant message content)."""
    model: str
    """The model name the final request was sent with (the base model after a fallback)."""
    requested_model: str
    """The model the caller asked for."""
    adapter: str | None = None
    """``x-loraplex-adapter``: what served it (``N@vK`` or the base name; None: not loraplex)."""
    fell_back: bool = False
    """True when the base model answered instead of the requested adapter."""
    fallback_by: Literal["client", "server"] | None = None
    """Who decided the fallback: the client after an error, or the server (its header)."""
    fallback_reason: str | None = None
    """The error that made the client fall back."""
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    request_id: str | None = None
    attempts: int = 1
    """HTTP attempts made in all, retries and fallback included."""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Chunk:
    """One streamed event: a text delta (maybe empty), and the finish reason or usage if sent."""

    text: str
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class CallMeta:
    """What the client knows about a call besides the body: model sent, attempts, fallback."""

    requested_model: str
    model: str
    attempts: int = 0
    fallback_reason: str | None = None


def _text_of(kind: Kind, choice: dict[str, Any], *, delta: bool) -> str:
    if kind == "completion":
        return choice.get("text") or ""
    message = choice.get("delta" if delta else "message") or {}
    return message.get("content") or ""


def _apply_headers(result: Completion, headers: httpx.Headers, meta: CallMeta) -> Completion:
    result.request_id = headers.get("x-request-id")
    result.adapter = headers.get("x-loraplex-adapter")
    result.attempts = meta.attempts
    if meta.fallback_reason is not None:
        result.fell_back, result.fallback_by = True, "client"
        result.fallback_reason = meta.fallback_reason
    elif headers.get("x-loraplex-fallback"):
        result.fell_back, result.fallback_by = True, "server"
    return result


def completion_from_body(
    kind: Kind, body: dict[str, Any], headers: httpx.Headers, meta: CallMeta
) -> Completion:
    """A ``Completion`` from a non-streamed response body."""
    choices = body.get("choices") or [{}]
    result = Completion(
        text=_text_of(kind, choices[0], delta=False),
        model=meta.model,
        requested_model=meta.requested_model,
        finish_reason=choices[0].get("finish_reason"),
        usage=dict(body.get("usage") or {}),
        raw=body,
    )
    return _apply_headers(result, headers, meta)


def parse_sse_line(line: str) -> dict[str, Any] | str | None:
    """The JSON of a ``data:`` line, ``DONE`` for ``[DONE]``, None for anything else."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data:
        return None
    if data == DONE:
        return DONE
    return json.loads(data)


class StreamAccumulator:
    """Turns decoded stream events into chunks and reassembles the whole completion."""

    def __init__(self, kind: Kind, headers: httpx.Headers, meta: CallMeta) -> None:
        self.kind, self.headers, self.meta = kind, headers, meta
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, int] = {}
        self.done = False

    def feed_line(self, line: str) -> Chunk | None:
        """The chunk of one SSE line; None for anything else (``[DONE]`` also sets ``done``)."""
        event = parse_sse_line(line)
        if event == DONE:
            self.done = True
            return None
        return self.feed(event) if isinstance(event, dict) else None

    def feed(self, event: dict[str, Any]) -> Chunk:
        """One chunk from one event; raises ``APIError`` for an error event."""
        if "error" in event:
            detail = event["error"]
            raise error_from_body(
                status_for_code(detail.get("code") if isinstance(detail, dict) else None),
                event,
                request_id=self.headers.get("x-request-id"),
            )
        choices = event.get("choices") or []
        text, finish = "", None
        if choices:
            text = _text_of(self.kind, choices[0], delta=True)
            finish = choices[0].get("finish_reason")
        if finish:
            self.finish_reason = finish
        usage = event.get("usage") or None
        if usage:
            self.usage = dict(usage)
        self.parts.append(text)
        return Chunk(text=text, finish_reason=finish, usage=usage, raw=event)

    def completion(self) -> Completion:
        """Everything received so far, as one ``Completion``."""
        result = Completion(
            text="".join(self.parts),
            model=self.meta.model,
            requested_model=self.meta.requested_model,
            finish_reason=self.finish_reason,
            usage=self.usage,
        )
        return _apply_headers(result, self.headers, self.meta)


def base_model_from_models(body: dict[str, Any]) -> str | None:
    """Guess the base model's name from a ``GET /v1/models`` body; None if unclear.

    vLLM and loraplex list adapters with ``parent`` = the base model's name; failing that,
    the single entry without a parent is the base.
    """
    data = [m for m in body.get("data") or [] if isinstance(m, dict) and m.get("id")]
    parents = {m["parent"] for m in data if m.get("parent")}
    if len(parents) == 1:
        return parents.pop()
    roots = [m["id"] for m in data if not m.get("parent")]
    return roots[0] if len(roots) == 1 else None


def adapter_names_from_models(body: dict[str, Any]) -> list[str]:
    """Names of the listed models other than the base model."""
    base = base_model_from_models(body)
    return [m["id"] for m in body.get("data") or [] if m.get("id") and m["id"] != base]
