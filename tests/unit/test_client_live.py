"""Sync and async clients against a real local HTTP server (the stub): retries counted on
the server side, fallback only on the right errors, streams reassembled. No model needed.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from test_client_stub import BASE, stub_server

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

FAST = RetryPolicy(max_retries=3, backoff_base=0.01, backoff_max=0.02)


@pytest.fixture
def stub():
    with stub_server() as (url, app):
        yield url, app


def test_sync_retries_429_and_503_counted_by_server(stub) -> None:
    url, app = stub
    with Client(url, retry=FAST) as client:
        for model in ("flaky429", "flaky503"):
            before = app.state.calls[model]
            result = client.completions(model, "hi", max_tokens=8)
            assert result.attempts == 3 and result.text == f"hello from {model}"
            assert app.state.calls[model] - before == 3
            assert result.adapter == f"{model}@v1" and result.request_id


def test_sync_fallback_only_when_adapter_unavailable(stub) -> None:
    url, app = stub
    with Client(url, retry=FAST, fallback=True) as client:
        for model in ("down", "boom", "incompatible"):
            result = client.completions(model, "hi")
            assert result.fell_back and result.model == BASE and result.requested_model == model
            assert result.text == f"hello from {BASE}" and result.adapter is None
        assert app.state.bodies[-1]["model"] == BASE
        for model, cls in (
            ("missing", NotFoundError),
            ("theirs", PermissionDeniedError),
            ("bad", BadRequestError),
            ("limited", RateLimitError),
        ):
            base_calls = app.state.calls[BASE]
            with pytest.raises(cls):
                client.completions(model, "hi")
            assert app.state.calls[BASE] == base_calls


def test_sync_without_fallback_raises_typed(stub) -> None:
    url, _ = stub
    with Client(url, retry=RetryPolicy(max_retries=0)) as client:
        with pytest.raises(UnavailableError):
            client.completions("down", "hi")
        with pytest.raises(InternalServerError):
            client.completions("boom", "hi")
        with pytest.raises(IncompatibleAdapterError):
            client.chat("incompatible", [{"role": "user", "content": "hi"}])


def test_sync_stream_reassembles_completion_and_chat(stub) -> None:
    url, _ = stub
    with Client(url) as client:
        with client.stream("completion", "a1", "hi", max_tokens=8) as stream:
            pieces = [c.text for c in stream]
        assert "".join(pieces) == "hello from a1" == stream.completion.text
        assert stream.completion.usage["completion_tokens"] == 3
        assert stream.completion.finish_reason == "length"
        chat = client.stream("chat", "a2", [{"role": "user", "content": "hi"}]).until_done()
        assert chat.text == "hello from a2" and chat.adapter == "a2@v1"


def test_sync_stream_falls_back_before_first_token(stub) -> None:
    url, _ = stub
    with Client(url, retry=RetryPolicy(max_retries=0), fallback=True) as client:
        done = client.stream("completion", "down", "hi").until_done()
    assert done.fell_back and done.text == f"hello from {BASE}"


def test_async_client_retries_streams_and_falls_back(stub) -> None:
    url, app = stub

    async def main() -> None:
        async with AsyncClient(url, retry=FAST, fallback=True) as client:
            before = app.state.calls["flaky429"]
            result = await client.chat("flaky429", [{"role": "user", "content": "x"}])
            assert result.text == "hello from flaky429"
            assert result.attempts == app.state.calls["flaky429"] - before
            stream = await client.stream("completion", "a3", "hi")
            assert (await stream.until_done()).text == "hello from a3"
            fell = await client.completions("down", "hi")
            assert fell.fell_back and fell.model == BASE
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
