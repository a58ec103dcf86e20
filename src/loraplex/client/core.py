"""What ``Client`` and ``AsyncClient`` share: settings, each call's request and reading, fallback.

Every call is described once, here, as a ``Call``: the ``Request`` to send and how the
successful response becomes the result. The fallback decision lives here too. The two
transports (``loraplex.client.client`` over ``httpx.Client``, ``loraplex.client.async_client``
over ``httpx.AsyncClient``) only run the I/O: send with a ``RetrySchedule``, sleep between
attempts, resend to the base model when told to, and read streams. No I/O happens here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import httpx

from loraplex.client.errors import APIConnectionError, APIError, allows_fallback
from loraplex.client.retry import RetryPolicy
from loraplex.client.types import (
    CallMeta,
    Completion,
    Kind,
    StreamAccumulator,
    base_model_from_models,
    completion_from_body,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Request:
    """One HTTP request, before the transport sends it."""

    method: str
    path: str
    body: Any = None
    headers: dict[str, str] | None = None
    stream: bool = False


@dataclass(frozen=True)
class Call(Generic[T]):
    """A request and how its successful response (after ``attempts`` tries) becomes ``T``."""

    request: Request
    read: Callable[[httpx.Response, int], T]


def request_body(kind: Kind, model: str, payload: Any, params: dict[str, Any], stream: bool):
    """The JSON body of a completion (``payload`` = prompt) or chat (``payload`` = messages)."""
    body: dict[str, Any] = {k: v for k, v in params.items() if v is not None}
    body["model"] = model
    body["prompt" if kind == "completion" else "messages"] = payload
    if stream:
        body["stream"] = True
        body.setdefault("stream_options", {"include_usage": True})
    else:
        body.pop("stream_options", None)
    return body


def path_for(kind: Kind) -> str:
    """The route of a kind."""
    return "/v1/completions" if kind == "completion" else "/v1/chat/completions"


class StreamCore:
    """What ``Stream`` and ``AsyncStream`` share: the open response and what it has said."""

    def __init__(self, response: httpx.Response, acc: StreamAccumulator) -> None:
        self.response = response
        self._acc = acc

    @property
    def completion(self) -> Completion:
        """All text received so far, with the call's metadata."""
        return self._acc.completion()


class ClientCore:
    """Settings, calls and decisions of a client; subclasses add the transport."""

    _stream_class: ClassVar[type[StreamCore]]
    """What a streamed call returns (set by each transport)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        fallback: bool = False,
        base_model: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.fallback = fallback
        self.base_model = base_model
        self.timeout = timeout
        self.headers = {"user-agent": "loraplex-client", **(headers or {})}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"

    @staticmethod
    def _completion_call(
        kind: Kind,
        payload: Any,
        params: dict[str, Any],
        headers: dict[str, str] | None,
        meta: CallMeta,
    ) -> Call[Completion]:
        def read(response: httpx.Response, attempts: int) -> Completion:
            meta.attempts += attempts
            return completion_from_body(kind, response.json(), response.headers, meta)

        body = request_body(kind, meta.model, payload, params, stream=False)
        return Call(Request("POST", path_for(kind), body, headers), read)

    def _stream_call(
        self,
        kind: Kind,
        payload: Any,
        params: dict[str, Any],
        headers: dict[str, str] | None,
        meta: CallMeta,
    ) -> Call[Any]:
        def read(response: httpx.Response, attempts: int) -> StreamCore:
            meta.attempts += attempts
            return self._stream_class(response, StreamAccumulator(kind, response.headers, meta))

        body = request_body(kind, meta.model, payload, params, stream=True)
        return Call(Request("POST", path_for(kind), body, headers, stream=True), read)

    @staticmethod
    def _models_call(headers: dict[str, str] | None) -> Call[dict[str, Any]]:
        return Call(Request("GET", "/v1/models", headers=headers), lambda r, _: r.json())

    @staticmethod
    def _generate_call(
        prompt: str, lora_name: str | None, params: dict[str, Any], headers: dict[str, str] | None
    ) -> Call[str]:
        body = {"prompt": prompt, "lora_name": lora_name, **params}
        return Call(Request("POST", "/generate", body, headers), lambda r, _: r.json()["text"])

    @staticmethod
    def _text_call(path: str, headers: dict[str, str] | None) -> Call[str]:
        return Call(Request("GET", path, headers=headers), lambda r, _: r.text)

    def _remember_base_model(self, listing: dict[str, Any]) -> str | None:
        self.base_model = base_model_from_models(listing)
        return self.base_model

    def _wants_fallback(
        self, model: str, exc: APIError | APIConnectionError, fallback: bool | None
    ) -> bool:
        """Whether this error on this model should be retried on the base model."""
        wanted = self.fallback if fallback is None else fallback
        return wanted and allows_fallback(exc) and model != self.base_model

    @staticmethod
    def _fallback_meta(
        model: str, exc: APIError | APIConnectionError, base: str | None
    ) -> CallMeta | None:
        """The call to send to the base model instead; None when there is no other model."""
        if base is None or base == model:
            return None
        return CallMeta(model, base, attempts=exc.attempts, fallback_reason=str(exc))
