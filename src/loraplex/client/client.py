"""Synchronous loraplex client: completions and chat, streaming, retries, labelled fallback.

``Client`` speaks the OpenAI wire format to any compatible server (loraplex or vLLM). It
retries 429/503 with backoff (see ``retry``), raises typed errors (see ``errors``) and, when
asked, falls back to the base model if the adapter cannot serve now, resending the request
with the base model's name and saying so in the result. ``AsyncClient`` lives in
``async_client``; both share ``_BaseClient``. This is not a load generator (see ``bench``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx

from loraplex.client.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    allows_fallback,
    error_from_response,
)
from loraplex.client.retry import RetryPolicy
from loraplex.client.types import (
    DONE,
    CallMeta,
    Chunk,
    Completion,
    Kind,
    StreamAccumulator,
    base_model_from_models,
    completion_from_body,
    parse_sse_line,
    path_for,
    request_body,
)
from loraplex.errors import LoraplexError

T = TypeVar("T")


class _BaseClient:
    """Settings and decisions shared by ``Client`` and ``AsyncClient``."""

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

    def _fallback_target(self, model: str, exc: LoraplexError, fallback: bool | None) -> bool:
        """Whether this error on this model should be retried on the base model."""
        wanted = self.fallback if fallback is None else fallback
        return wanted and allows_fallback(exc) and model != self.base_model

    @staticmethod
    def _transport_error(exc: httpx.TransportError) -> APIConnectionError:
        cls = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
        return cls(f"{type(exc).__name__}: {exc or 'no response from the server'}")

    @staticmethod
    def _connect_failed(exc: httpx.TransportError) -> bool:
        """No request reached the server, so resending it is always safe."""
        return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)


class Client(_BaseClient):
    """Blocking client. Use as a context manager or call ``close()``.

    ``fallback=True`` (or per call) lets the base model answer when the adapter returns
    503/5xx or 409 ``adapter_incompatible``; ``base_model`` is discovered from
    ``GET /v1/models`` when not given.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_url, api_key, **kwargs)
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _send(
        self, method: str, path: str, body: Any, *, stream: bool, headers: dict | None = None
    ) -> tuple[httpx.Response, int]:
        """Send with retries; returns a successful response and the attempts it took."""
        attempt = 0
        while True:
            attempt += 1
            try:
                request = self._http.build_request(method, path, json=body, headers=headers)
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                error: LoraplexError = self._transport_error(exc)
                error.__cause__ = exc
                delay = self.retry.delay(attempt) if self._connect_failed(exc) else None
            else:
                if response.status_code < 400:
                    return response, attempt
                response.read()
                response.close()
                error = error_from_response(response)
                delay = None
                if self.retry.retryable(response.status_code):
                    delay = self.retry.delay(attempt, error.retry_after)
            if delay is None:
                error.attempts = attempt
                raise error
            self._sleep(delay)

    def _with_fallback(self, model: str, fallback: bool | None, call: Callable[[CallMeta], T]) -> T:
        meta = CallMeta(requested_model=model, model=model)
        try:
            return call(meta)
        except (APIError, APIConnectionError) as exc:
            if not self._fallback_target(model, exc, fallback):
                raise
            base = self.base_model or self.discover_base_model()
            if base is None or base == model:
                raise
            fb = CallMeta(model, base, attempts=exc.attempts, fallback_reason=str(exc))
            try:
                return call(fb)
            except LoraplexError as second:
                raise second from exc

    def _complete(
        self, kind: Kind, meta: CallMeta, payload: Any, params: dict, headers: dict | None
    ) -> Completion:
        body = request_body(kind, meta.model, payload, params, stream=False)
        response, attempts = self._send("POST", path_for(kind), body, stream=False, headers=headers)
        meta.attempts += attempts
        return completion_from_body(kind, response.json(), response.headers, meta)

    def _open_stream(
        self, kind: Kind, meta: CallMeta, payload: Any, params: dict, headers: dict | None
    ) -> Stream:
        body = request_body(kind, meta.model, payload, params, stream=True)
        response, attempts = self._send("POST", path_for(kind), body, stream=True, headers=headers)
        meta.attempts += attempts
        return Stream(response, StreamAccumulator(kind, response.headers, meta))

    def completions(
        self,
        model: str,
        prompt: str,
        *,
        fallback: bool | None = None,
        headers: dict[str, str] | None = None,
        **params: Any,
    ) -> Completion:
        """``POST /v1/completions``; ``params`` are OpenAI fields (max_tokens, temperature...).

        ``headers`` are added to this request only.
        """
        return self._with_fallback(
            model, fallback, lambda m: self._complete("completion", m, prompt, params, headers)
        )

    def chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        *,
        fallback: bool | None = None,
        headers: dict[str, str] | None = None,
        **params: Any,
    ) -> Completion:
        """``POST /v1/chat/completions``; returns the assistant message as ``text``."""
        return self._with_fallback(
            model, fallback, lambda m: self._complete("chat", m, messages, params, headers)
        )

    def stream(
        self,
        kind: Kind,
        model: str,
        payload: Any,
        *,
        fallback: bool | None = None,
        headers: dict[str, str] | None = None,
        **params: Any,
    ) -> Stream:
        """Open a streamed completion (``payload`` = prompt) or chat (``payload`` = messages).

        Iterate the returned ``Stream`` for chunks, then read ``.completion``.
        """
        return self._with_fallback(
            model, fallback, lambda m: self._open_stream(kind, m, payload, params, headers)
        )

    def models(self) -> dict[str, Any]:
        """``GET /v1/models`` as returned."""
        response, _ = self._send("GET", "/v1/models", None, stream=False)
        return response.json()

    def discover_base_model(self) -> str | None:
        """The base model's name from ``/v1/models`` (cached in ``base_model``)."""
        if self.base_model is None:
            self.base_model = base_model_from_models(self.models())
        return self.base_model

    def generate(self, prompt: str, lora_name: str | None = None, **params: Any) -> str:
        """``POST /generate`` (the original script's route); returns the text."""
        body = {"prompt": prompt, "lora_name": lora_name, **params}
        response, _ = self._send("POST", "/generate", body, stream=False)
        return response.json()["text"]


class Stream:
    """An open streamed response: iterate for ``Chunk``s; ``completion`` reassembles them.

    Close it (or use ``with``) if you stop reading early.
    """

    def __init__(self, response: httpx.Response, acc: StreamAccumulator) -> None:
        self.response = response
        self._acc = acc

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the connection."""
        self.response.close()

    def __iter__(self) -> Iterator[Chunk]:
        try:
            for line in self.response.iter_lines():
                event = parse_sse_line(line)
                if event == DONE:
                    self._acc.done = True
                    break
                if isinstance(event, dict):
                    yield self._acc.feed(event)
        except httpx.TransportError as exc:
            raise _BaseClient._transport_error(exc) from exc
        finally:
            self.close()

    @property
    def completion(self) -> Completion:
        """All text received so far, with the call's metadata."""
        return self._acc.completion()

    def until_done(self) -> Completion:
        """Read the rest of the stream and return the whole completion."""
        for _ in self:
            pass
        return self.completion
