"""Pure logic of the client: error mapping, Retry-After, backoff, retry loop, fallback rules.

HTTP is faked with ``httpx.MockTransport`` and sleeping with a recorder, so nothing waits.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from loraplex import errors
from loraplex.client import (
    APIConnectionError,
    AsyncClient,
    Client,
    IncompatibleAdapterError,
    NotFoundError,
    RateLimitError,
    RetryPolicy,
    UnavailableError,
)
from loraplex.client.errors import allows_fallback, error_from_body, parse_retry_after
from loraplex.client.types import base_model_from_models, parse_sse_line


def _error(status: int, code: str, headers: dict | None = None) -> httpx.Response:
    body = {"error": {"message": f"m{status}", "type": "t", "code": code}}
    return httpx.Response(status, json=body, headers=headers or {})


def _ok(model: str) -> httpx.Response:
    return httpx.Response(200, json={"choices": [{"text": f"hi {model}", "finish_reason": "stop"}]})


class Script:
    """A transport answering from a per-model list of responses; records request bodies."""

    def __init__(self, plan: dict[str, list[httpx.Response]]) -> None:
        self.plan = plan
        self.bodies: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(
                200, json={"data": [{"id": "base"}, {"id": "ad", "parent": "base"}]}
            )
        body = json.loads(request.content)
        self.bodies.append(body)
        queue = self.plan[body["model"]]
        return queue.pop(0) if len(queue) > 1 else queue[0]


def _client(script: Script, sleeps: list[float], **kwargs) -> Client:
    policy = kwargs.pop("retry", RetryPolicy(max_retries=3, rng=random.Random(1)))
    return Client(
        "http://test",
        transport=httpx.MockTransport(script),
        sleep=sleeps.append,
        retry=policy,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("status", "code", "cls", "server_cls"),
    [
        (400, "invalid_request", "BadRequestError", errors.InvalidRequest),
        (400, "invalid_adapter", "InvalidAdapterError", errors.InvalidAdapter),
        (401, "invalid_api_key", "AuthenticationError", errors.Unauthorized),
        (403, "forbidden", "PermissionDeniedError", errors.Forbidden),
        (404, "model_not_found", "NotFoundError", errors.NotFound),
        (409, "adapter_incompatible", "IncompatibleAdapterError", errors.IncompatibleAdapter),
        (413, "too_large", "PayloadTooLargeError", errors.TooLarge),
        (429, "rate_limited", "RateLimitError", errors.RateLimited),
        (503, "unavailable", "UnavailableError", errors.Unavailable),
        (502, "bad_gateway", "InternalServerError", errors.LoraplexError),
    ],
)
def test_error_mapping_mirrors_server_classes(status, code, cls, server_cls) -> None:
    exc = error_from_body(status, {"error": {"message": "why", "type": "x", "code": code}})
    assert type(exc).__name__ == cls
    assert isinstance(exc, server_cls)
    assert exc.status_code == status and exc.code == code and exc.message == "why"


def test_error_mapping_of_odd_bodies() -> None:
    assert error_from_body(404, {"detail": "Not Found"}).message == "Not Found"
    assert "empty body" in error_from_body(500, "").message
    assert error_from_body(418, "teapot").status_code == 418


def test_parse_retry_after() -> None:
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= parse_retry_after(later) <= 31


def test_backoff_grows_is_jittered_and_capped() -> None:
    policy = RetryPolicy(max_retries=10, backoff_base=1.0, backoff_max=4.0, rng=random.Random(0))
    for retry in range(1, 11):
        assert 0 <= policy.delay(retry) <= min(4.0, 2 ** (retry - 1))
    assert policy.delay(11) is None
    assert 2.0 <= policy.delay(1, retry_after=2.0) <= 2.2
    assert policy.delay(1, retry_after=3600) is None
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)


def test_retries_429_then_succeeds_honouring_retry_after() -> None:
    script = Script({"ad": [_error(429, "rate_limited", {"retry-after": "1"})] * 2 + [_ok("ad")]})
    sleeps: list[float] = []
    with _client(script, sleeps) as client:
        result = client.completions("ad", "x")
    assert result.text == "hi ad" and result.attempts == 3 and not result.fell_back
    assert len(sleeps) == 2 and all(1.0 <= s <= 1.1 for s in sleeps)


def test_gives_up_after_max_retries_with_count() -> None:
    script = Script({"ad": [_error(503, "unavailable")]})
    sleeps: list[float] = []
    with _client(script, sleeps) as client, pytest.raises(UnavailableError) as info:
        client.completions("ad", "x")
    assert info.value.attempts == 4 and len(sleeps) == 3 and len(script.bodies) == 4


def test_too_long_retry_after_is_not_waited_for() -> None:
    script = Script({"ad": [_error(429, "rate_limited", {"retry-after": "9999"})]})
    sleeps: list[float] = []
    with _client(script, sleeps) as client, pytest.raises(RateLimitError) as info:
        client.completions("ad", "x")
    assert info.value.retry_after == 9999 and sleeps == [] and info.value.attempts == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413])
def test_no_retry_on_client_errors(status: int) -> None:
    script = Script({"ad": [_error(status, "whatever")]})
    sleeps: list[float] = []
    with _client(script, sleeps) as client, pytest.raises(errors.LoraplexError):
        client.completions("ad", "x")
    assert sleeps == [] and len(script.bodies) == 1


def test_fallback_resends_with_base_model_name_and_says_so() -> None:
    script = Script({"ad": [_error(503, "unavailable")], "base": [_ok("base")]})
    sleeps: list[float] = []
    with _client(script, sleeps, fallback=True, retry=RetryPolicy(max_retries=1)) as client:
        result = client.completions("ad", "x", max_tokens=5)
    assert result.fell_back and result.fallback_by == "client" and result.model == "base"
    assert result.requested_model == "ad" and "503" in result.fallback_reason
    assert result.attempts == 3
    assert [b["model"] for b in script.bodies] == ["ad", "ad", "base"]
    assert script.bodies[-1]["max_tokens"] == 5 and "lora_name" not in script.bodies[-1]


def test_fallback_on_incompatible_adapter() -> None:
    script = Script({"ad": [_error(409, "adapter_incompatible")], "base": [_ok("base")]})
    with _client(script, [], fallback=True, base_model="base") as client:
        assert client.completions("ad", "x").fell_back


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "invalid_request"),
        (401, "k"),
        (403, "forbidden"),
        (404, "model_not_found"),
        (409, "conflict"),
        (413, "too_large"),
        (429, "rate_limited"),
    ],
)
def test_never_falls_back_on_caller_errors(status: int, code: str) -> None:
    script = Script({"ad": [_error(status, code, {"retry-after": "9999"})], "base": [_ok("b")]})
    with _client(script, [], fallback=True) as client, pytest.raises(errors.LoraplexError):
        client.completions("ad", "x")
    assert {b["model"] for b in script.bodies} == {"ad"}


def test_fallback_is_opt_in_and_can_be_set_per_call() -> None:
    script = Script({"ad": [_error(503, "unavailable")], "base": [_ok("base")]})
    with _client(script, [], retry=RetryPolicy(max_retries=0)) as client:
        with pytest.raises(UnavailableError):
            client.completions("ad", "x")
        assert client.completions("ad", "x", fallback=True).fell_back


def test_failed_fallback_raises_the_base_error_chained() -> None:
    script = Script({"ad": [_error(503, "unavailable")], "base": [_error(404, "model_not_found")]})
    client = _client(script, [], fallback=True, retry=RetryPolicy(max_retries=0))
    with client, pytest.raises(NotFoundError) as info:
        client.completions("ad", "x")
    assert isinstance(info.value.__cause__, UnavailableError)


def test_connection_refused_is_retried_then_raised() -> None:
    calls = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("refused", request=request)

    sleeps: list[float] = []
    client = Client(
        "http://test",
        transport=httpx.MockTransport(refuse),
        sleep=sleeps.append,
        retry=RetryPolicy(max_retries=2),
        fallback=True,
        base_model="base",
    )
    with client, pytest.raises(APIConnectionError) as info:
        client.completions("ad", "x")
    assert info.value.attempts == 3 and len(calls) == 3 and len(sleeps) == 2


def test_server_side_fallback_header_is_reported() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={"choices": [{"message": {"content": "ok"}}]},
            headers={"x-loraplex-fallback": "base", "x-request-id": "r1"},
        )

    with Client("http://t", transport=httpx.MockTransport(answer)) as client:
        result = client.chat("ad", [{"role": "user", "content": "hi"}])
    assert result.text == "ok" and result.fell_back and result.fallback_by == "server"
    assert result.request_id == "r1"


def test_sse_and_models_parsing() -> None:
    assert parse_sse_line('data: {"a": 1}') == {"a": 1}
    assert parse_sse_line("data: [DONE]") == "[DONE]"
    assert parse_sse_line(": keep-alive") is None
    assert base_model_from_models({"data": [{"id": "b"}, {"id": "x", "parent": "b"}]}) == "b"
    assert base_model_from_models({"data": [{"id": "b"}]}) == "b"
    assert base_model_from_models({"data": [{"id": "b"}, {"id": "c"}]}) is None


def test_allows_fallback_rules() -> None:
    assert allows_fallback(UnavailableError("x", status_code=503))
    assert allows_fallback(IncompatibleAdapterError("x", status_code=409))
    assert not allows_fallback(NotFoundError("x", status_code=404))
    assert not allows_fallback(APIConnectionError("down"))


def test_error_event_inside_a_stream_is_typed() -> None:
    from loraplex.client.types import CallMeta, StreamAccumulator

    acc = StreamAccumulator("completion", httpx.Headers(), CallMeta("ad", "ad"))
    assert acc.feed({"choices": [{"text": "a"}]}).text == "a"
    with pytest.raises(UnavailableError):
        acc.feed({"error": {"message": "engine died", "code": "unavailable"}})
    assert acc.completion().text == "a"


def _public_calls(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(getattr(cls, name))
        for name in dir(cls)
        if not name.startswith("_") and callable(getattr(cls, name))
    }


def test_sync_and_async_clients_offer_the_same_calls() -> None:
    sync, not_sync = _public_calls(Client), _public_calls(AsyncClient)
    assert set(sync) == set(not_sync)
    assert {"completions", "chat", "stream", "models", "generate", "get_text"} <= set(sync)
    for name, signature in sync.items():
        assert list(signature.parameters) == list(not_sync[name].parameters), name
        assert inspect.iscoroutinefunction(getattr(AsyncClient, name)), name


class Recorder:
    """A transport answering ``/generate``, ``/v1/models`` and ``/metrics``; records requests."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None, bytes]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.url.path, request.headers.get("authorization"), request.content))
        if request.url.path == "/generate":
            return httpx.Response(200, json={"text": "Arr"})
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "base"}]})
        return httpx.Response(200, text="metric 1\n")


def test_generate_models_and_get_text_of_the_blocking_client() -> None:
    recorder = Recorder()
    with Client("http://t", transport=httpx.MockTransport(recorder)) as client:
        assert client.generate("Hi", lora_name="pirate", max_tokens=4) == "Arr"
        assert client.models(headers={"authorization": "Bearer k1"})["data"][0]["id"] == "base"
        assert client.get_text("/metrics") == "metric 1\n"
    generate, listing, scrape = recorder.seen
    assert json.loads(generate[2]) == {"prompt": "Hi", "lora_name": "pirate", "max_tokens": 4}
    assert listing[:2] == ("/v1/models", "Bearer k1") and scrape[:2] == ("/metrics", None)


def test_generate_models_and_get_text_of_the_async_client() -> None:
    recorder = Recorder()

    async def calls() -> tuple[str, dict, str]:
        async with AsyncClient("http://t", transport=httpx.MockTransport(recorder)) as client:
            return (
                await client.generate("Hi", lora_name="pirate", max_tokens=4),
                await client.models(headers={"authorization": "Bearer k1"}),
                await client.get_text("/metrics"),
            )

    text, models, metrics = asyncio.run(calls())
    assert (text, models["data"][0]["id"], metrics) == ("Arr", "base", "metric 1\n")
    generate, listing, scrape = recorder.seen
    assert json.loads(generate[2]) == {"prompt": "Hi", "lora_name": "pirate", "max_tokens": 4}
    assert listing[:2] == ("/v1/models", "Bearer k1") and scrape[:2] == ("/metrics", None)


def test_async_client_retries_and_falls_back_like_the_blocking_one() -> None:
    script = Script({"ad": [_error(503, "unavailable")], "base": [_ok("base")]})
    sleeps: list[float] = []

    async def record(seconds: float) -> None:
        sleeps.append(seconds)

    async def call():
        client = AsyncClient(
            "http://test",
            transport=httpx.MockTransport(script),
            sleep=record,
            retry=RetryPolicy(max_retries=1, rng=random.Random(1)),
            fallback=True,
        )
        async with client:
            return await client.completions("ad", "x", max_tokens=5)

    result = asyncio.run(call())
    assert result.fell_back and result.fallback_by == "client" and result.attempts == 3
    assert [b["model"] for b in script.bodies] == ["ad", "ad", "base"] and len(sleeps) == 1
