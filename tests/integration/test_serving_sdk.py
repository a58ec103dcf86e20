"""The official openai SDK against a running loraplex: chat and completions, streamed and
not, for the base model and two adapters."""

from __future__ import annotations

import pytest
from openai import OpenAI

pytestmark = pytest.mark.integration
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("model", ["smollm2-135m", "pirate", "shout"])
def test_chat_streamed_equals_non_streamed(client: OpenAI, model: str) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0
    )
    text = whole.choices[0].message.content
    assert text
    assert whole.usage.completion_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert finish in ("stop", "length")


@pytest.mark.parametrize("model", ["smollm2-135m", "pirate", "shout"])
def test_completion_streamed_equals_non_streamed(client: OpenAI, model: str) -> None:
    prompt = "The three primary colors are"
    whole = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    text = whole.choices[0].text
    assert text and 0 < whole.usage.completion_tokens <= 12
    forced = client.completions.create(
        model=model, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert forced.usage.completion_tokens == 12 and forced.choices[0].finish_reason == "length"
    stream = client.completions.create(
        model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == text


def test_adapters_change_the_answer(client: OpenAI) -> None:
    answers = {
        model: client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=24,
            temperature=0,
        )
        .choices[0]
        .message.content
        for model in ("smollm2-135m", "pirate", "shout")
    }
    assert len(set(answers.values())) == 3, answers


def test_models_lists_base_and_adapters(client: OpenAI) -> None:
    ids = {m.id for m in client.models.list().data}
    assert {"smollm2-135m", "pirate", "shout", "random1", "random2"} <= ids


def test_stop_seed_and_top_p(client: OpenAI) -> None:
    stopped = client.completions.create(
        model="smollm2-135m", prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0, stop=[" 6"]
    )
    assert " 6" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    sampled = [
        client.completions.create(
            model="pirate",
            prompt="Once upon a time",
            max_tokens=12,
            temperature=1.0,
            top_p=0.9,
            seed=7,
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
