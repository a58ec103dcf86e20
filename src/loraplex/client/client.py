"""Blocking loraplex client: completions and chat, streaming, retries, labelled fallback.

``Client`` speaks the OpenAI wire format to any compatible server (loraplex or vLLM). It
retries 429/503 with backoff (see ``retry``), raises typed errors (see ``errors``) and, when
asked, falls back to the base model if the adapter cannot serve now, resending the request
with the base model's name and saying so in the result. What each call sends and how it is
read lives in ``core``, shared with ``AsyncClient``; this module is the blocking I/O only.
This is not a load generator (see ``bench``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, TypeVar

import httpx

from loraplex.client.core import Call, ClientCore, StreamCore
from loraplex.client.errors import APIConnectionError, APIError, error_from_transport
from loraplex.client.retry import RetrySchedule
from loraplex.client.types import CallMeta, Chunk, Completion, Kind
from loraplex.errors import LoraplexError

T = TypeVar("T")


class Stream(StreamCore):
    """An open streamed response: iterate for ``Chunk``s; ``completion`` reassembles them.

    Close it (or use ``with``) if you stop reading early.
    """

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
                chunk = self._acc.feed_line(line)
                if self._acc.done:
                    break
                if chunk is not None:
                    yield chunk
        except httpx.TransportError as exc:
            raise error_from_transport(exc) from exc
        finally:
            self.close()

    def until_done(self) -> Completion:
        """Read the rest of the stream and return the whole completion."""
        for _ in self:
            pass
        return self.completion


class Client(ClientCore):
    """Blocking client. Use as a context manager or call ``close()``.

    ``fallback=True`` (or per call) lets the base model answer when the adapter returns
    503/5xx or 409 ``adapter_incompatible``; ``base_model`` is discovered from
    ``GET /v1/models`` when not given. ``headers=`` on a call adds headers to that request
    only (e.g. another tenant's key).
    """

    _stream_class = Stream

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

    def _run(self, call: Call[T]) -> T:
        """Send with retries and read the successful response."""
        r = call.request
        schedule = RetrySchedule(self.retry)
        while True:
            request = self._http.build_request(r.method, r.path, json=r.body, headers=r.headers)
            try:
                response = self._http.send(request, stream=r.stream)
            except httpx.TransportError as exc:
                self._sleep(schedule.after_transport_error(exc))
                continue
            if response.status_code < 400:
                return call.read(response, schedule.attempt)
            response.read()
            response.close()
            self._sleep(schedule.after_error_response(response))

    def _run_with_fallback(
        self, model: str, fallback: bool | None, make: Callable[[CallMeta], Call[T]]
    ) -> T:
        try:
            return self._run(make(CallMeta(model, model)))
        except (APIError, APIConnectionError) as exc:
            if not self._wants_fallback(model, exc, fallback):
                raise
            meta = self._fallback_meta(model, exc, self.discover_base_model())
            if meta is None:
                raise
            try:
                return self._run(make(meta))
            except LoraplexError as second:
                raise second from exc

    def completions(
        self,
        model: str,
        prompt: str,
        *,
        fallback: bool | None = None,
        headers: dict[str, str] | None = None,
        **params: Any,
    ) -> Completion:
        """``POST /v1/completions``; ``params`` are OpenAI fields (max_tokens, temperature...)."""
        make = partial(self._completion_call, "completion", prompt, params, headers)
        return self._run_with_fallback(model, fallback, make)

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
        make = partial(self._completion_call, "chat", messages, params, headers)
        return self._run_with_fallback(model, fallback, make)

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
        make = partial(self._stream_call, kind, payload, params, headers)
        return self._run_with_fallback(model, fallback, make)

    def models(self, headers: dict[str, str] | None = None) -> dict[str, Any]:
        """``GET /v1/models`` as returned."""
        return self._run(self._models_call(headers))

    def discover_base_model(self) -> str | None:
        """The base model's name from ``/v1/models`` (cached in ``base_model``)."""
        if self.base_model is None:
            return self._remember_base_model(self.models())
        return self.base_model

    def generate(
        self,
        prompt: str,
        lora_name: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        **params: Any,
    ) -> str:
        """``POST /generate`` (``{prompt, lora_name, ...}`` -> ``{text}``); returns the text."""
        return self._run(self._generate_call(prompt, lora_name, params, headers))

    def get_text(self, path: str, headers: dict[str, str] | None = None) -> str:
        """GET any path and return the body text (e.g. ``/metrics``)."""
        return self._run(self._text_call(path, headers))
