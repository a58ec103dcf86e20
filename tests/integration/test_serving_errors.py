"""Bad input gets the right status and an OpenAI error body, and the server keeps serving.
Also: identical prompts at once both succeed with distinct request ids, headers, /generate,
health and readiness."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import pytest

pytestmark = pytest.mark.integration


def chat(model: str, content: str = "Hi", **extra) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        "temperature": 0,
        **extra,
    }


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if code:
        assert error["code"] == code
    return error


def assert_still_serving(url: str) -> None:
    response = httpx.post(url + "/v1/chat/completions", json=chat("pirate"), timeout=120)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("model", ["nope", "pirate@v99", "../pirate", "PIRATE", "pirate/../x", ""])
def test_unknown_adapter_is_404_never_base(server, model: str) -> None:
    response = httpx.post(server.url + "/v1/chat/completions", json=chat(model), timeout=60)
    if model == "":
        assert_error(response, 400)
    else:
        assert_error(response, 404, "model_not_found")
        assert "x-loraplex-adapter" not in response.headers
    assert_still_serving(server.url)


def test_generate_unknown_lora_is_404(server) -> None:
    body = {"prompt": "Hello", "lora_name": "missing", "max_tokens": 4}
    assert_error(httpx.post(server.url + "/generate", json=body, timeout=60), 404)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"model": "pirate", "messages": [',  # malformed JSON
        b"[1, 2, 3]",
        b'{"model": "pirate"}',  # no messages
        b'{"model": "pirate", "messages": []}',
        b'{"model": "pirate", "messages": [{"role": "robot", "content": "hi"}]}',
        b'{"model": "pirate", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}',
        b'{"model": "pirate", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}',
        b'{"model": "pirate", "messages": [{"role": "user", "content": "hi"}], "n": 99}',
        b'{"model": "pirate", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
    ],
)
def test_invalid_body_is_400(server, payload: bytes) -> None:
    response = httpx.post(
        server.url + "/v1/chat/completions",
        content=payload,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert_error(response, 400, "invalid_request")
    assert_still_serving(server.url)


def test_prompt_longer_than_context_is_400(server) -> None:
    body = {"model": "pirate", "prompt": "word " * 5000, "max_tokens": 4}
    error = assert_error(httpx.post(server.url + "/v1/completions", json=body, timeout=60), 400)
    assert "context" in error["message"]


def test_oversized_body_is_413(server) -> None:
    body = {"model": "pirate", "prompt": "x" * 2_000_000, "max_tokens": 4}
    assert_error(httpx.post(server.url + "/v1/completions", json=body, timeout=60), 413)
    assert_still_serving(server.url)


def test_broken_adapter_fails_alone(server, adapters_dir) -> None:
    broken = adapters_dir / "broken"
    broken.mkdir(exist_ok=True)
    shutil.copy(adapters_dir / "random1" / "adapter_config.json", broken)
    data = (adapters_dir / "random1" / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 3])
    try:
        response = httpx.post(server.url + "/v1/chat/completions", json=chat("broken"), timeout=120)
        error = assert_error(response, 400, "invalid_adapter")
        assert "is not a valid safetensors file" in error["message"]
        assert_still_serving(server.url)
        assert httpx.get(server.url + "/ready", timeout=30).status_code == 200
    finally:
        shutil.rmtree(broken)


def test_identical_prompts_at_once_both_succeed(server) -> None:
    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            body = chat("shout", "Tell me a joke.")
            return await asyncio.gather(
                *(client.post("/v1/chat/completions", json=body) for _ in range(4))
            )

    responses = asyncio.run(both())
    assert all(r.status_code == 200 for r in responses)
    assert len({r.headers["x-request-id"] for r in responses}) == 4
    assert len({r.json()["choices"][0]["message"]["content"] for r in responses}) == 1
    assert all(r.headers["x-loraplex-adapter"].startswith("shout@") for r in responses)


def test_generate_compat_route(server) -> None:
    body = {
        "prompt": "The capital of France is",
        "lora_name": "pirate",
        "max_tokens": 8,
        "temperature": 0,
    }
    response = httpx.post(server.url + "/generate", json=body, timeout=60)
    assert response.status_code == 200 and response.json()["text"]
    assert response.headers["x-loraplex-adapter"].startswith("pirate@")
    base = httpx.post(server.url + "/generate", json={**body, "lora_name": None}, timeout=60)
    assert base.headers["x-loraplex-adapter"] == server.base


def test_health_ready_metrics(server) -> None:
    assert httpx.get(server.url + "/health", timeout=30).json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready", timeout=30).status_code == 200
    text = httpx.get(server.url + "/metrics", timeout=30).text
    assert "loraplex_requests_total" in text and "loraplex_adapter_cache_hits_total" in text
