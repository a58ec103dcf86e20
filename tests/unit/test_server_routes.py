"""The OpenAI routes over a fake engine: SSE framing, response bodies, headers, /v1/models.

The app is the real one (middleware, error handlers, service, adapters folder, the bundled
model's tokenizer); only the engine is fake (``FakeEngine`` in fake_engine.py), so these tests
say nothing about generation itself: the integration tests cover that.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from route_checks import BASE, Serve, assert_error, chat, sse_data
from transformers import AutoTokenizer

from loraplex.errors import Unavailable

if TYPE_CHECKING:
    from fake_engine import FakeEngine

pytestmark = pytest.mark.anyio


# ---- streaming: SSE framing


async def test_chat_stream_is_sse_framed_with_usage(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    body = chat("sales", stream=True, stream_options={"include_usage": True})
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    adapter = response.headers["x-loraplex-adapter"]
    assert adapter.startswith("sales@sha-") and "x-loraplex-fallback" not in response.headers
    data = sse_data(response)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    *content, usage = chunks
    assert {c["id"] for c in chunks} == {response.headers["x-request-id"]}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert content[0]["choices"][0]["delta"] == {"role": "assistant", "content": "hello"}
    assert all("role" not in c["choices"][0]["delta"] for c in content[1:])
    text = "".join(c["choices"][0]["delta"]["content"] for c in content)
    assert text == f"hello from {adapter}"
    assert [c["choices"][0]["finish_reason"] for c in content] == [None, None, "stop"]
    prompt_tokens = len(engine.generations[0].prompt_ids)
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 3,
        "total_tokens": prompt_tokens + 3,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_completion_stream_is_sse_framed(client: httpx.AsyncClient) -> None:
    body = {"model": BASE, "prompt": "Hello", "max_tokens": 2, "stream": True}
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200 and response.headers["x-loraplex-adapter"] == BASE
    data = sse_data(response)
    assert data[-1] == "[DONE]" and len(data) == 3  # no usage chunk unless asked
    chunks = [json.loads(d)["choices"][0] for d in data[:-1]]
    assert [c["text"] for c in chunks] == ["hello", " from"]
    assert [c["finish_reason"] for c in chunks] == [None, "length"]
    assert response.headers["x-request-id"].startswith("cmpl-")


async def test_an_engine_error_mid_stream_is_an_event_then_done(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.stream_error, engine.fail_after = Unavailable("engine died"), 1
    response = await client.post("/v1/chat/completions", json=chat("sales", stream=True))
    assert response.status_code == 200  # the status was sent with the first token
    data = sse_data(response)
    assert json.loads(data[0])["choices"][0]["delta"]["content"] == "hello"
    error = json.loads(data[1])["error"]
    assert error == {"message": "engine died", "type": "server_error", "code": "unavailable"}
    assert data[2:] == ["[DONE]"]


async def test_streaming_takes_one_prompt(client: httpx.AsyncClient) -> None:
    body = {"model": BASE, "prompt": ["a", "b"], "stream": True}
    assert_error(await client.post("/v1/completions", json=body), 400, "invalid_request")


# ---- non-streaming bodies


async def test_chat_body_with_n_choices(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    response = await client.post("/v1/chat/completions", json=chat(BASE, n=2, max_tokens=8))
    assert response.status_code == 200
    assert response.headers["x-loraplex-adapter"] == BASE
    assert response.headers["x-request-id"].startswith("chatcmpl-")
    payload = response.json()
    assert payload["object"] == "chat.completion" and payload["model"] == BASE
    assert payload["id"] == response.headers["x-request-id"]
    assert payload["choices"] == [
        {
            "index": i,
            "message": {"role": "assistant", "content": "hello from base", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
        for i in range(2)
    ]
    prompt_tokens = len(engine.generations[0].prompt_ids)
    assert payload["usage"] == {
        "prompt_tokens": 2 * prompt_tokens,
        "completion_tokens": 6,
        "total_tokens": 2 * prompt_tokens + 6,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    params = engine.generations[0].params
    assert (params.n, params.max_tokens, params.temperature) == (2, 8, 1.0)


async def test_completion_body_for_a_list_of_prompts(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    body = {"model": "support", "prompt": ["One", "Two three"], "max_tokens": 2, "stop": "x"}
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200
    payload = response.json()
    assert payload["object"] == "text_completion"
    assert [(c["index"], c["text"], c["finish_reason"]) for c in payload["choices"]] == [
        (0, "hello from", "length"),
        (1, "hello from", "length"),
    ]
    assert payload["usage"]["prompt_tokens"] == sum(len(g.prompt_ids) for g in engine.generations)
    assert payload["usage"]["completion_tokens"] == 4
    assert {g.adapter.name for g in engine.generations} == {"support"}
    assert {tuple(g.params.stop) for g in engine.generations} == {("x",)}


async def test_generate_route(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    response = await client.post("/generate", json={"prompt": "Hi", "lora_name": "sales"})
    version = response.headers["x-loraplex-adapter"]
    assert response.status_code == 200 and version.startswith("sales@sha-")
    assert response.json() == {"text": f"hello from {version}"}
    params = engine.generations[-1].params
    assert (params.max_tokens, params.temperature) == (256, 0.7)
    response = await client.post("/generate", json={"prompt": "Hi", "max_tokens": 1})
    assert response.json() == {"text": "hello"} and response.headers["x-loraplex-adapter"] == BASE
    assert response.headers["x-request-id"].startswith("gen-")


async def test_generate_prompts_each_adapter_as_trained(
    client: httpx.AsyncClient, engine: FakeEngine, adapters_root: Path, model_dir: Path
) -> None:
    (adapters_root / "support" / "loraplex.json").write_text('{"prompt_format": "chat"}')
    prompts = {}
    for name in ("support", "sales"):
        response = await client.post("/generate", json={"prompt": "Hi there", "lora_name": name})
        assert response.status_code == 200, response.text
        prompts[name] = engine.generations[-1].prompt_ids
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], add_generation_prompt=True, tokenize=False
    )
    assert tokenizer.decode(prompts["support"]) == chat
    assert tokenizer.decode(prompts["sales"]) == "Hi there"


async def test_models_lists_base_and_adapters(client: httpx.AsyncClient) -> None:
    payload = (await client.get("/v1/models")).json()
    assert payload["object"] == "list"
    assert [(m["id"], m["parent"]) for m in payload["data"]] == [
        (BASE, None),
        ("sales", BASE),
        ("support", BASE),
    ]


async def test_echo_logprobs_is_refused_without_the_fast_lora_ops(serve: Serve) -> None:
    async with serve(fast_lora="off") as client:
        body = {"model": "sales", "prompt": "Hi", "echo": True, "logprobs": 1, "max_tokens": 0}
        response = await client.post("/v1/completions", json=body)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "echo"
        assert "LORAPLEX_FAST_LORA=off" in response.json()["error"]["message"]
        del body["echo"]
        body["max_tokens"] = 2
        assert (await client.post("/v1/completions", json=body)).status_code == 200
