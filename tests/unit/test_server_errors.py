"""Errors over HTTP with a fake engine: status codes and OpenAI bodies, the body size limit
(declared or chunked), and the labelled fallback to the base model.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from route_checks import BASE, assert_error, chat, sse_data

from loraplex.adapter_sources import RegistryAdapterSource
from loraplex.errors import IncompatibleAdapter, Unavailable
from loraplex.registry.basedims import BaseDims
from loraplex.registry.registry import Registry
from loraplex.testing.random_adapters import write_random_adapter

if TYPE_CHECKING:
    from fake_engine import FakeEngine
    from route_checks import Serve

pytestmark = pytest.mark.anyio


# ---- errors: status codes and OpenAI bodies


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/chat/completions",
        content=b'{"model": "sales", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert_error(response, 400, "invalid_request")


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/v1/chat/completions", {"model": "sales"}, "messages"),
        ("/v1/chat/completions", chat("sales", temperature=9), "temperature"),
        ("/v1/chat/completions", chat("sales", n=99), "n"),
        ("/v1/chat/completions", chat("sales", n=2, temperature=0), "temperature"),
        ("/v1/completions", {"model": "sales", "prompt": "Hi", "n": 2, "temperature": 0}, "n > 1"),
        ("/v1/chat/completions", chat("sales", max_tokens=0), "max_tokens"),
        ("/v1/chat/completions", chat("sales", stop=["a", "b", "c", "d", "e"]), "stop"),
        ("/v1/chat/completions", {"model": "sales", "messages": []}, "messages"),
        ("/v1/chat/completions", chat(""), "model"),
        ("/v1/completions", {"model": "sales"}, "prompt"),
        ("/generate", {"prompt": "Hi", "model": "sales"}, "model"),  # extra fields refused
    ],
)
async def test_invalid_fields_are_400_naming_the_field(
    client: httpx.AsyncClient, engine: FakeEngine, route: str, body: dict, field: str
) -> None:
    message = assert_error(await client.post(route, json=body), 400, "invalid_request")
    assert field in message and not engine.generations


async def test_content_parts_other_than_text_are_400(client: httpx.AsyncClient) -> None:
    body = {"model": BASE, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
    message = assert_error(
        await client.post("/v1/chat/completions", json=body), 400, "invalid_request"
    )
    assert "text content" in message


async def test_a_prompt_beyond_the_context_is_400(serve: Serve) -> None:
    async with serve(max_model_len=16) as client:
        body = {"model": BASE, "prompt": "word " * 40, "max_tokens": 1}
        message = assert_error(
            await client.post("/v1/completions", json=body), 400, "invalid_request"
        )
    assert "context is 16 tokens" in message


@pytest.mark.parametrize("model", ["nope", "sales@v2", "sales:canary", "Sales"])
async def test_unknown_model_is_404_never_the_base(
    client: httpx.AsyncClient, engine: FakeEngine, model: str
) -> None:
    response = await client.post("/v1/chat/completions", json=chat(model))
    assert_error(response, 404, "model_not_found")
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "x-loraplex-adapter" not in response.headers
    assert not engine.generations


async def test_generate_unknown_lora_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/generate", json={"prompt": "Hi", "lora_name": "nope"})
    assert_error(response, 404, "model_not_found")


async def test_unknown_route_is_404_openai_shaped(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/nothing"), 404, "not_found")


async def test_incompatible_adapter_is_409(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.load_errors["sales"] = IncompatibleAdapter("rank 128 above 64")
    response = await client.post("/v1/chat/completions", json=chat("sales"))
    assert assert_error(response, 409, "adapter_incompatible") == "rank 128 above 64"
    assert not engine.generations and "x-loraplex-fallback" not in response.headers


async def test_engine_unavailable_is_503_with_retry_after(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.stream_error = Unavailable("the engine is down", retry_after=3)
    response = await client.post("/v1/chat/completions", json=chat("sales"))
    assert assert_error(response, 503, "unavailable") == "the engine is down"
    assert response.headers["retry-after"] == "3"
    engine.stream_error = None
    engine.load_errors["sales"] = Unavailable("no room for the adapter")
    response = await client.post("/v1/completions", json={"model": "sales", "prompt": "Hi"})
    assert assert_error(response, 503, "unavailable") == "no room for the adapter"


# ---- body size limit


async def test_a_declared_large_body_is_413(serve: Serve, engine: FakeEngine) -> None:
    async with serve(max_request_bytes=2048) as client:
        body = {"model": "sales", "prompt": "x" * 4096}
        response = await client.post("/v1/completions", json=body)
    assert "content-length" in response.request.headers
    assert "the limit is 2048" in assert_error(response, 413, "too_large")
    assert not engine.generations


async def chunks(body: bytes, size: int = 100) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def test_a_chunked_large_body_is_413(serve: Serve, engine: FakeEngine) -> None:
    body = json.dumps({"model": "sales", "prompt": "x" * 4096}).encode()
    async with serve(max_request_bytes=2048) as client:
        response = await client.post("/v1/completions", content=chunks(body))
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert "the limit is 2048" in assert_error(response, 413, "too_large")
    assert not engine.generations


async def test_a_chunked_body_within_the_limit_is_served(serve: Serve) -> None:
    body = json.dumps({"model": "sales", "prompt": "Hello", "max_tokens": 1}).encode()
    async with serve(max_request_bytes=2048) as client:
        response = await client.post(
            "/v1/completions", content=chunks(body, 7), headers={"content-type": "application/json"}
        )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == "hello"


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/v1/completions", {"x-big": "a" * 3000}),
        ("/v1/completions", {f"x-h{i}": "a" for i in range(400)}),
        ("/v1/completions?" + "q" * 3000, {}),
        ("/health", {"x-big": "a" * 3000}),
    ],
)
async def test_headers_over_the_limit_are_413(
    serve: Serve, engine: FakeEngine, path: str, headers: dict[str, str]
) -> None:
    async with serve(max_header_bytes=2048) as client:
        response = await client.post(path, json={"model": "sales", "prompt": "x"}, headers=headers)
        assert "the limit is 2048" in assert_error(response, 413, "too_large")
        assert (await client.get("/health", headers={"x-small": "a" * 1000})).status_code == 200
    assert not engine.generations


# ---- fallback: only where the adapter's policy allows it, and labelled


async def test_fallback_to_base_is_labelled(
    serve: Serve, engine: FakeEngine, registry: Registry, tmp_path: Path, tiny_dims: BaseDims
) -> None:
    folder = write_random_adapter(tmp_path / "a", tiny_dims)
    registry.push(folder, "lenient", fallback_to_base=True)
    registry.push(folder, "strict")
    engine.load_errors = {name: Unavailable("cannot load") for name in ("lenient", "strict")}
    async with serve(source=RegistryAdapterSource(registry)) as client:
        response = await client.post("/v1/chat/completions", json=chat("lenient", stream=True))
        assert response.headers["x-loraplex-adapter"] == BASE
        assert response.headers["x-loraplex-fallback"] == "base"
        text = "".join(
            json.loads(d)["choices"][0]["delta"]["content"] for d in sse_data(response)[:-1]
        )
        assert text == "hello from base"
        strict = await client.post("/v1/chat/completions", json=chat("strict"))
        assert_error(strict, 503, "unavailable")
        assert "x-loraplex-fallback" not in strict.headers
        metrics = (await client.get("/metrics")).text
    assert 'loraplex_fallbacks_total{adapter="lenient"} 1.0' in metrics
    assert 'adapter="strict"' not in metrics.split("loraplex_fallbacks_total", 1)[1].split("#")[0]


async def test_registry_versions_and_aliases_are_served_by_version(
    serve: Serve, registry: Registry, tmp_path: Path, tiny_dims: BaseDims
) -> None:
    registry.push(write_random_adapter(tmp_path / "a", tiny_dims, seed=1), "sales")
    registry.push(write_random_adapter(tmp_path / "b", tiny_dims, seed=2), "sales")
    registry.promote("sales@v2", "canary")
    async with serve(source=RegistryAdapterSource(registry)) as client:
        served = {
            model: (await client.post("/v1/chat/completions", json=chat(model))).headers[
                "x-loraplex-adapter"
            ]
            for model in ("sales", "sales@v2", "sales:canary")
        }
    assert served == {"sales": "sales@v1", "sales@v2": "sales@v2", "sales:canary": "sales@v2"}
