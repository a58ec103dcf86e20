"""The client against the real server (real vLLM engine, fp32): happy path, streaming
reassembled, typed 404 without fallback, labelled fallback to the base model on an adapter
that cannot load, and the async client under concurrency. Retries on 429/503 are tested
against a real local HTTP server in tests/unit/test_client_live.py (the real server does
not answer those on demand).
"""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from loraplex.client import (
    AsyncClient,
    Client,
    IncompatibleAdapterError,
    NotFoundError,
    RetryPolicy,
)

pytestmark = pytest.mark.integration

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"max_tokens": 12, "temperature": 0}


def test_completion_and_chat_name_the_adapter(server) -> None:
    with Client(server.url) as client:
        done = client.completions("pirate", PROMPT, **GREEDY)
        chat = client.chat("shout", CHAT, **GREEDY)
        base = client.chat(server.base, CHAT, **GREEDY)
    assert done.adapter.startswith("pirate@") and done.request_id and done.finish_reason
    assert done.usage["completion_tokens"] > 0 and done.attempts == 1 and not done.fell_back
    assert chat.text and chat.adapter.startswith("shout@") and chat.model == "shout"
    assert base.text and not base.fell_back


@pytest.mark.parametrize(
    ("kind", "model", "payload"), [("completion", None, PROMPT), ("chat", "random1", CHAT)]
)
def test_stream_reassembles_the_same_text(server, kind: str, model, payload) -> None:
    model = model or server.base
    with Client(server.url) as client:
        whole = (client.completions if kind == "completion" else client.chat)(
            model, payload, **GREEDY
        )
        with client.stream(kind, model, payload, **GREEDY) as stream:
            pieces = [chunk.text for chunk in stream]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == stream.completion.text == whole.text
    assert stream.completion.usage["completion_tokens"] == whole.usage["completion_tokens"]
    assert stream.completion.adapter == whole.adapter


def test_unknown_adapter_is_a_typed_404_and_never_falls_back(server) -> None:
    with Client(server.url, fallback=True) as client:
        with pytest.raises(NotFoundError) as info:
            client.chat("no-such-adapter", CHAT, **GREEDY)
        with pytest.raises(NotFoundError):
            client.stream("completion", "pirate@v99", PROMPT, **GREEDY)
    assert info.value.status_code == 404 and info.value.code == "model_not_found"
    assert info.value.attempts == 1 and "no-such-adapter" in info.value.message


def test_broken_adapter_falls_back_to_base_only_when_asked(server, adapters_dir) -> None:
    broken = adapters_dir / "client-broken"
    broken.mkdir(exist_ok=True)
    shutil.copy(adapters_dir / "random2" / "adapter_model.safetensors", broken)
    config = json.loads((adapters_dir / "random2" / "adapter_config.json").read_text())
    # rank 4 in the config, 8 in the tensors: shapes that do not fit the base (409)
    (broken / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    try:
        with Client(server.url, retry=RetryPolicy(max_retries=1)) as client:
            with pytest.raises(IncompatibleAdapterError):
                client.chat("client-broken", CHAT, **GREEDY)
            fell = client.chat("client-broken", CHAT, fallback=True, **GREEDY)
            base = client.chat(server.base, CHAT, **GREEDY)
            streamed = client.stream("chat", "client-broken", CHAT, fallback=True, **GREEDY)
            streamed_done = streamed.until_done()
    finally:
        shutil.rmtree(broken)
    assert (
        fell.fell_back
        and fell.fallback_by == "client"
        and "adapter_incompatible" in (fell.fallback_reason or "")
    )
    assert fell.model == server.base and fell.requested_model == "client-broken"
    assert fell.adapter == base.adapter and fell.text == base.text
    assert streamed_done.fell_back and streamed_done.text == base.text


def test_async_client_concurrent_adapters(server) -> None:
    async def main() -> list:
        async with AsyncClient(server.url) as client:
            calls = [client.chat(m, CHAT, **GREEDY) for m in ("pirate", "shout", "random1") * 2]
            stream = await client.stream("chat", "shout", CHAT, **GREEDY)
            results = await asyncio.gather(*calls)
            return [*results, await stream.until_done()]

    results = asyncio.run(main())
    for result in results:
        assert result.text and result.adapter.startswith(result.requested_model + "@")
    assert results[0].text == results[3].text and results[1].text == results[4].text
