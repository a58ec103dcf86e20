"""Sync and async clients against a real local HTTP server (the stub): retries counted on
the server side, fallback only on the right errors, streams reassembled. No model needed.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

import httpx
import pytest

from loraplex.client import (
    APIConnectionError,
    AsyncClient,
    BadRequestError,
    Client,
    IncompatibleAdapterError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RetryPolicy,
    UnavailableError,
)

if TYPE_CHECKING:
    from stub_server import StubServer

FAST = RetryPolicy(max_retries=3, backoff_base=0.01, backoff_max=0.02)


def test_sync_retries_429_and_503_counted_by_server(stub: StubServer) -> None:
    url, app = stub.url, stub.app
    with Client(url, retry=FAST) as client:
        for model in ("flaky429", "flaky503"):
            before = app.state.calls[model]
            result = client.completions(model, "hi", max_tokens=8)
            assert result.attempts == 3 and result.text == f"hello from {model}"
            assert app.state.calls[model] - before == 3
            assert result.adapter == f"{model}@v1" and result.request_id


def test_sync_fallback_only_when_adapter_unavailable(stub: StubServer) -> None:
    url, app = stub.url, stub.app
    with Client(url, retry=FAST, fallback=True) as client:
        for model in ("down", "boom", "incompatible"):
            result = client.completions(model, "hi")
            assert result.fell_back and result.requested_model == model
            assert result.model == stub.base
            assert result.text == f"hello from {stub.base}" and result.adapter is None
        assert app.state.bodies[-1]["model"] == stub.base
        for model, cls in (
            ("missing", NotFoundError),
            ("theirs", PermissionDeniedError),
            ("bad", BadRequestError),
            ("limited", RateLimitError),
        ):
            base_calls = app.state.calls[stub.base]
            with pytest.raises(cls):
                client.completions(model, "hi")
            assert app.state.calls[stub.base] == base_calls


def test_sync_without_fallback_raises_typed(stub: StubServer) -> None:
    url = stub.url
    with Client(url, retry=RetryPolicy(max_retries=0)) as client:
        with pytest.raises(UnavailableError):
            client.completions("down", "hi")
        with pytest.raises(InternalServerError):
            client.completions("boom", "hi")
        with pytest.raises(IncompatibleAdapterError):
            client.chat("incompatible", [{"role": "user", "content": "hi"}])


def test_sync_stream_reassembles_completion_and_chat(stub: StubServer) -> None:
    url = stub.url
    with Client(url) as client:
        with client.stream("completion", "a1", "hi", max_tokens=8) as stream:
            pieces = [c.text for c in stream]
        assert "".join(pieces) == "hello from a1" == stream.completion.text
        assert stream.completion.usage["completion_tokens"] == 3
        assert stream.completion.finish_reason == "length"
        chat = client.stream("chat", "a2", [{"role": "user", "content": "hi"}]).until_done()
        assert chat.text == "hello from a2" and chat.adapter == "a2@v1"


def test_sync_stream_falls_back_before_first_token(stub: StubServer) -> None:
    url = stub.url
    with Client(url, retry=RetryPolicy(max_retries=0), fallback=True) as client:
        done = client.stream("completion", "down", "hi").until_done()
    assert done.fell_back and done.text == f"hello from {stub.base}"


def test_async_client_retries_streams_and_falls_back(stub: StubServer) -> None:
    url, app = stub.url, stub.app

    async def main() -> None:
        async with AsyncClient(url, retry=FAST, fallback=True) as client:
            before = app.state.calls["flaky429"]
            result = await client.chat("flaky429", [{"role": "user", "content": "x"}])
            assert result.text == "hello from flaky429"
            assert result.attempts == app.state.calls["flaky429"] - before
            stream = await client.stream("completion", "a3", "hi")
            assert (await stream.until_done()).text == "hello from a3"
            fell = await client.completions("down", "hi")
            assert fell.fell_back and fell.model == stub.base
            with pytest.raises(NotFoundError):
                await client.completions("missing", "hi")

    asyncio.run(main())


def test_connection_refused_is_retried_then_typed() -> None:
    sleeps: list[float] = []
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = Client(url, retry=RetryPolicy(max_retries=2, backoff_base=0.01), sleep=sleeps.append)
    with client, pytest.raises(APIConnectionError) as info:
        client.completions("a1", "hi")
    assert info.value.attempts == 3 and len(sleeps) == 2


def test_stub_serves_models_and_errors(stub: StubServer) -> None:
    assert httpx.get(f"{stub.url}/v1/models").json()["data"][0]["id"] == stub.base
    reply = httpx.post(f"{stub.url}/v1/completions", json={"model": "missing", "prompt": "x"})
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "model_not_found"
