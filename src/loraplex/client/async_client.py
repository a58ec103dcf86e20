"""Asynchronous loraplex client: the same calls as ``Client``, awaitable.

Same retry, error and fallback rules as ``loraplex.client.client`` (whose ``_BaseClient``
holds them); streams are ``AsyncStream``s to ``async for`` over. The load generator in
``loraplex.client.bench`` is built on this class.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import httpx

from loraplex.client.client import _BaseClient
from loraplex.client.errors import APIConnectionError, APIError, error_from_response
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


class AsyncClient(_BaseClient):
    """Non-blocking client. Use ``async with`` or ``await close()``."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        limits: httpx.Limits | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_url, api_key, **kwargs)
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self.headers,
            timeout=self.timeout,
            transport=transport,
            limits=limits or httpx.Limits(max_connections=1000, max_keepalive_connections=1000),
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def _send(
        self, method: str, path: str, body: Any, *, stream: bool, headers: dict | None = None
    ) -> tuple[httpx.Response, int]:
        """Send with retries; returns a successful response and the attempts it took."""
        attempt = 0
        while True:
            attempt += 1
            try:
                request = self._http.build_request(method, path, json=body, headers=headers)
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                error: LoraplexError = self._transport_error(exc)
                error.__cause__ = exc
                delay = self.retry.delay(attempt) if self._connect_failed(exc) else None
            else:
                if response.status_code < 400:
                    return response, attempt
                await response.aread()
                await response.aclose()
                error = error_from_response(response)
                delay = None
                if self.retry.retryable(response.status_code):
                    delay = self.retry.delay(attempt, error.retry_after)
            if delay is None:
                error.attempts = attempt
                raise error
            await self._sleep(delay)

    async def _with_fallback(
        self, model: str, fallback: bool | None, call: Callable[[CallMeta], Awaitable[T]]
    ) -> T:
        try:
            return await call(CallMeta(model, model))
        except (APIError, APIConnectionError) as exc:
            if not self._fallback_target(model, exc, fallback):
                raise
            base = self.base_model or await self.discover_base_model()
            if base is None or base == model:
                raise
            try:
                return await call(CallMeta(model, base, exc.attempts, str(exc)))
            except LoraplexError as second:
                raise second from exc

    async def _complete(
        self, kind: Kind, meta: CallMeta, payload: Any, params: dict, headers: dict | None
    ) -> Completion:
        body = request_body(kind, meta.model, payload, params, stream=False)
        response, attempts = await self._send(
            "POST", path_for(kind), body, stream=False, headers=headers
        )
        meta.attempts += attempts
        return completion_from_body(kind, response.json(), response.headers, meta)

    async def _open_stream(
        self, kind: Kind, meta: CallMeta, payload: Any, params: dict, headers: dict | None
    ) -> AsyncStream:
        body = request_body(kind, meta.model, payload, params, stream=True)
        response, attempts = await self._send(
            "POST", path_for(kind), body, stream=True, headers=headers
        )
        meta.attempts += attempts
        return AsyncStream(response, StreamAccumulator(kind, response.headers, meta))

    async def completions(
        self,
        model: str,
        prompt: str,
        *,
        fallback: bool | None = None,
        headers: dict[str, str] | None = None,
        **params: Any,
    ) -> Completion:
        """``POST /v1/completions``; ``headers`` are added to this request only."""
        return await self._with_fallback(
            model, fallback, lambda m: self._complete("completion", m, prompt, params, headers)
        )

    async def chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        *,
        fallback: bool | None = None,
        headers: dict[str, str] | None = None,
        **params: Any,
    ) -> Completion:
        """``POST /v1/chat/completions``."""
        return await self._with_fallback(
            model, fallback, lambda m: self._complete("chat", m, messages, params, headers)
        )

    async def stream(
        self,
        kind: Kind,
        model: str,
        payload: Any,
        *,
        fallback: bool | None = None,
        headers: dict[str, str] | None = None,
        **params: Any,
    ) -> AsyncStream:
        """Open a streamed completion (``payload`` = prompt) or chat (``payload`` = messages)."""
        return await self._with_fallback(
            model, fallback, lambda m: self._open_stream(kind, m, payload, params, headers)
        )

    async def models(self, headers: dict[str, str] | None = None) -> dict[str, Any]:
        """``GET /v1/models`` as returned (``headers``: e.g. another tenant's key)."""
        response, _ = await self._send("GET", "/v1/models", None, stream=False, headers=headers)
        return response.json()

    async def discover_base_model(self) -> str | None:
        """The base model's name from ``/v1/models`` (cached in ``base_model``)."""
        if self.base_model is None:
            self.base_model = base_model_from_models(await self.models())
        return self.base_model

    async def get_text(self, path: str) -> str:
        """GET any path and return the body text (e.g. ``/metrics``)."""
        response, _ = await self._send("GET", path, None, stream=False)
        return response.text


class AsyncStream:
    """An open streamed response: ``async for`` ``Chunk``s; ``completion`` reassembles them."""

    def __init__(self, response: httpx.Response, acc: StreamAccumulator) -> None:
        self.response = response
        self._acc = acc

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Release the connection."""
        await self.response.aclose()

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        try:
            async for line in self.response.aiter_lines():
                event = parse_sse_line(line)
                if event == DONE:
                    self._acc.done = True
                    break
                if isinstance(event, dict):
                    yield self._acc.feed(event)
        except httpx.TransportError as exc:
            raise _BaseClient._transport_error(exc) from exc
        finally:
            await self.close()

    @property
    def completion(self) -> Completion:
        """All text received so far, with the call's metadata."""
        return self._acc.completion()

    async def until_done(self) -> Completion:
        """Read the rest of the stream and return the whole completion."""
        async for _ in self:
            pass
        return self.completion
