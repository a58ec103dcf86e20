"""Asynchronous loraplex client: the same calls as ``Client``, awaitable.

Same requests, retry, error and fallback rules as ``loraplex.client.client`` (both take them
from ``loraplex.client.core``); this module is the asyncio I/O only. Streams are
``AsyncStream``s to ``async for`` over. The load generator in ``loraplex.client.bench`` is
built on this class.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import httpx

from loraplex.client.core import Call, ClientCore, StreamCore
from loraplex.client.errors import APIConnectionError, APIError, error_from_transport
from loraplex.client.retry import RetrySchedule
from loraplex.client.types import CallMeta, Chunk, Completion, Kind
from loraplex.errors import LoraplexError

T = TypeVar("T")


class AsyncStream(StreamCore):
    """An open streamed response: ``async for`` ``Chunk``s; ``completion`` reassembles them."""

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
                chunk = self._acc.feed_line(line)
                if self._acc.done:
                    break
                if chunk is not None:
                    yield chunk
        except httpx.TransportError as exc:
            raise error_from_transport(exc) from exc
        finally:
            await self.close()

    async def until_done(self) -> Completion:
        """Read the rest of the stream and return the whole completion."""
        async for _ in self:
            pass
        return self.completion


class AsyncClient(ClientCore):
    """Non-blocking ``Client``. Use ``async with`` or ``await close()``."""

    _stream_class = AsyncStream

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

    async def _run(self, call: Call[T]) -> T:
        """Send with retries and read the successful response."""
        r = call.request
        schedule = RetrySchedule(self.retry)
        while True:
            request = self._http.build_request(r.method, r.path, json=r.body, headers=r.headers)
            try:
                response = await self._http.send(request, stream=r.stream)
            except httpx.TransportError as exc:
                await self._sleep(schedule.after_transport_error(exc))
                continue
            if response.status_code < 400:
                return call.read(response, schedule.attempt)
            await response.aread()
            await response.aclose()
            await self._sleep(schedule.after_error_response(response))

    async def _run_with_fallback(
        self, model: str, fallback: bool | None, make: Callable[[CallMeta], Call[T]]
    ) -> T:
        try:
            return await self._run(make(CallMeta(model, model)))
        except (APIError, APIConnectionError) as exc:
            if not self._wants_fallback(model, exc, fallback):
                raise
            meta = self._fallback_meta(model, exc, await self.discover_base_model())
            if meta is None:
                raise
            try:
                return await self._run(make(meta))
            except LoraplexError as second:
                raise second from exc

    async def completions(
        self,
        model: str,
        prompt: str,
        *,
        fallback: bool | None = None,
        headers: dict[str, str] | None = None,
        **params: Any,
    ) -> Completion:
        """``POST /v1/completions``, as ``Client.completions``."""
        make = partial(self._completion_call, "completion", prompt, params, headers)
        return await self._run_with_fallback(model, fallback, make)

    async def chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        *,
        fallback: bool | None = None,
        headers: dict[str, str] | None = None,
        **params: Any,
    ) -> Completion:
        """``POST /v1/chat/completions``, as ``Client.chat``."""
        make = partial(self._completion_call, "chat", messages, params, headers)
        return await self._run_with_fallback(model, fallback, make)

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
        """Open a streamed completion or chat, as ``Client.stream``; ``async for`` it."""
        make = partial(self._stream_call, kind, payload, params, headers)
        return await self._run_with_fallback(model, fallback, make)

    async def models(self, headers: dict[str, str] | None = None) -> dict[str, Any]:
        """``GET /v1/models`` as returned."""
        return await self._run(self._models_call(headers))

    async def discover_base_model(self) -> str | None:
        """The base model's name from ``/v1/models`` (cached in ``base_model``)."""
        if self.base_model is None:
            return self._remember_base_model(await self.models())
        return self.base_model

    async def generate(
        self,
        prompt: str,
        lora_name: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        **params: Any,
    ) -> str:
        """``POST /generate``, as ``Client.generate``."""
        return await self._run(self._generate_call(prompt, lora_name, params, headers))

    async def get_text(self, path: str, headers: dict[str, str] | None = None) -> str:
        """GET any path and return the body text (e.g. ``/metrics``)."""
        return await self._run(self._text_call(path, headers))
