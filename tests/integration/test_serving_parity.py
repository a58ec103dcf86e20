"""Served greedy output equals transformers + PEFT for the same adapter and prompt, differs
from the base model, and does not change when requests for other adapters share the batch."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

pytestmark = pytest.mark.integration
PROMPTS = [
    "What is the capital of France?",
    "Name a fruit that is yellow.",
    "Write one sentence about the sea.",
]
NEW_TOKENS = 20


def served_chat(url: str, model: str, question: str) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
    }
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def reference_chat(base_model_dir, adapter_dir, question: str) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("adapter", ["pirate", "random1"])
def test_adapter_matches_transformers_peft(server, base_model_dir, adapters_dir, adapter) -> None:
    differs = 0
    for question in PROMPTS:
        served = served_chat(server.url, adapter, question)
        assert served == reference_chat(base_model_dir, adapters_dir / adapter, question)
        differs += served != served_chat(server.url, server.base, question)
    # The trained demo changes every answer; small random weights change at least one.
    assert differs == len(PROMPTS) if adapter == "pirate" else differs >= 1


def test_base_matches_transformers(server, base_model_dir) -> None:
    question = PROMPTS[0]
    assert served_chat(server.url, server.base, question) == reference_chat(
        base_model_dir, None, question
    )


def test_mixed_batch_equals_solo(server) -> None:
    models = ["pirate", "shout", server.base, "pirate", "random1", "random2"]
    question = PROMPTS[0]
    solo = {m: served_chat(server.url, m, question) for m in set(models)}

    async def together() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

            async def one(model: str) -> str:
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": question}],
                    "max_tokens": NEW_TOKENS,
                    "temperature": 0,
                }
                response = await client.post("/v1/chat/completions", json=body)
                response.raise_for_status()
                return response.json()["choices"][0]["message"]["content"]

            return await asyncio.gather(*(one(m) for m in models))

    assert asyncio.run(together()) == [solo[m] for m in models]


def test_a_shared_prefix_never_crosses_adapters(server) -> None:
    """Checklist case 11: two adapters (and the base) alternate 1,000 times on one long
    prompt with prefix caching on; every answer equals that model's first answer, and the
    cache was used (so a cached block of one adapter would have been a chance to cross)."""
    system = "You answer questions about geography for a harbour office. " * 20
    models = ["pirate", "shout", server.base]
    body = {
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": PROMPTS[0]},
        ],
        "max_tokens": 6,
        "temperature": 0,
    }

    async def alternate() -> tuple[dict[str, str], list[tuple[str, str, int]]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:

            async def one(model: str) -> tuple[str, str, int]:
                response = await client.post("/v1/chat/completions", json={**body, "model": model})
                response.raise_for_status()
                payload = response.json()
                cached = payload["usage"]["prompt_tokens_details"]["cached_tokens"]
                return model, payload["choices"][0]["message"]["content"], cached

            first = {m: (await one(m))[1] for m in models}
            limit = asyncio.Semaphore(16)

            async def limited(model: str) -> tuple[str, str, int]:
                async with limit:
                    return await one(model)

            runs = [limited(models[i % len(models)]) for i in range(1000)]
            return first, await asyncio.gather(*runs)

    first, runs = asyncio.run(alternate())
    assert first["pirate"] != first[server.base], first  # a crossed block would show
    assert [text for _, text, _ in runs] == [first[model] for model, _, _ in runs]
    assert sum(cached > 0 for _, _, cached in runs) > 900  # the prefix cache served them
