"""OpenAI compatibility through clients no one here wrote (issue 13), on the session server.

The official ``openai`` SDK: chat and completions logprobs (streamed and not, base and an
adapter), echo scoring (``max_tokens=0``), ``response_format`` json_object and json_schema
(output that parses and validates), penalties and ``logit_bias`` taking effect,
``GET /v1/models/{id}``, and every "400 naming the parameter" case. LangChain's
``ChatOpenAI`` streams a chat answer from an adapter.
"""

from __future__ import annotations

import json
import math

import jsonschema
import pytest
from openai import BadRequestError, NotFoundError, OpenAI

pytestmark = pytest.mark.integration
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("model", ["smollm2-135m", "pirate"])
def test_chat_logprobs_streamed_and_not(client: OpenAI, model: str) -> None:
    args = dict(model=model, messages=QUESTION, max_tokens=8, temperature=0, logprobs=True)
    whole = client.chat.completions.create(**args, top_logprobs=2)
    choice = whole.choices[0]
    content = choice.logprobs.content
    joined = "".join(t.token for t in content)  # the end token, when generated, included
    assert joined.removesuffix("<|im_end|>") == choice.message.content
    assert len(content) == whole.usage.completion_tokens
    for token in content:
        tops = [alt.logprob for alt in token.top_logprobs]
        assert len(tops) == 2 and tops == sorted(tops, reverse=True)
        assert token.logprob == pytest.approx(tops[0], abs=1e-4)  # greedy: the likeliest
        assert token.top_logprobs[0].token == token.token
        assert bytes(token.bytes).decode() == token.token
    streamed = [
        token
        for chunk in client.chat.completions.create(**args, top_logprobs=2, stream=True)
        for c in chunk.choices
        if c.logprobs
        for token in c.logprobs.content
    ]
    assert [(t.token, round(t.logprob, 3)) for t in streamed] == [
        (t.token, round(t.logprob, 3)) for t in content
    ]
    bare = client.chat.completions.create(**args).choices[0].logprobs.content
    assert [t.top_logprobs for t in bare] == [[]] * len(bare)  # top_logprobs unset: none


@pytest.mark.parametrize("model", ["smollm2-135m", "pirate"])
def test_completion_logprobs_and_echo(client: OpenAI, model: str) -> None:
    args = dict(model=model, prompt=PROMPT, temperature=0, logprobs=2)
    whole = client.completions.create(**args, max_tokens=6)
    lp = whole.choices[0].logprobs
    assert "".join(lp.tokens) == whole.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert token in top and top[token] == logprob and len(top) <= 3
    stream = client.completions.create(**args, max_tokens=6, stream=True)
    streamed = [t for c in stream for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
    assert streamed == lp.tokens

    scored = client.completions.create(**args, max_tokens=0, echo=True)
    echo = scored.choices[0].logprobs
    assert scored.choices[0].text == PROMPT and "".join(echo.tokens) == PROMPT
    assert echo.token_logprobs[0] is None and echo.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in echo.token_logprobs[1:])
    both = client.completions.create(**args, max_tokens=6, echo=True).choices[0]
    assert both.text == PROMPT + whole.choices[0].text
    assert both.logprobs.tokens == echo.tokens + lp.tokens
    assert both.logprobs.token_logprobs[: len(echo.tokens)] == pytest.approx(
        echo.token_logprobs, abs=1e-4
    )
    echoed = "".join(
        ch.text
        for c in client.completions.create(**args, max_tokens=6, echo=True, stream=True)
        for ch in c.choices
    )
    assert echoed == both.text


def test_adapter_changes_prompt_logprobs(client: OpenAI) -> None:
    def score(model: str) -> list[float]:
        reply = client.completions.create(
            model=model, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0
        )
        return reply.choices[0].logprobs.token_logprobs[1:]

    pairs = zip(score("pirate"), score("smollm2-135m"), strict=True)
    assert not all(math.isclose(a, b) for a, b in pairs)


SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "London", "Rome"]},
        "confident": {"type": "boolean"},
    },
    "required": ["city", "confident"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("model", ["smollm2-135m", "pirate"])
def test_response_format_json_schema_and_object(client: OpenAI, model: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    reply = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=40, temperature=0, response_format=fmt
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    free = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe Paris as a JSON object."}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )
    text = free.choices[0].message.content
    if free.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut at max_tokens: still the start of one JSON object
        assert text.lstrip().startswith("{")


def test_penalties_and_logit_bias_take_effect(client: OpenAI, base_model_dir) -> None:
    from transformers import AutoTokenizer

    (paris,) = AutoTokenizer.from_pretrained(str(base_model_dir)).encode(" Paris")
    args = dict(model="pirate", prompt=PROMPT, temperature=0, max_tokens=3)
    biased = client.completions.create(**args, logit_bias={str(paris): 100})
    assert biased.choices[0].text == " Paris" * 3
    args = dict(args, prompt="apple, apple, apple, apple, apple,", max_tokens=8)
    plain = client.completions.create(**args).choices[0].text
    assert plain.count("apple") > 1  # the repetition the penalties must change
    for penalty in ("presence_penalty", "frequency_penalty"):
        penalised = client.completions.create(**args, **{penalty: 2.0}).choices[0].text
        assert penalised != plain, penalty


BAD = [
    ("chat", {"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ("chat", {"extra_body": {"best_of": 2}}, "best_of"),
    ("chat", {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),
    ("chat", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("chat", {"modalities": ["text", "audio"]}, "modalities"),
    ("chat", {"store": True}, "store"),
    ("chat", {"reasoning_effort": "low"}, "reasoning_effort"),
    ("chat", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("chat", {"n": 2, "temperature": 0}, "n"),
    ("chat", {"presence_penalty": 3}, "presence_penalty"),
    ("chat", {"logit_bias": {"1": 101}}, "logit_bias"),
    ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),
    (
        "chat",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": 3}},
            }
        },
        "response_format.json_schema.schema",
    ),
    ("chat", {"response_format": {"type": "yaml"}}, "response_format.type"),
    ("completions", {"suffix": "end"}, "suffix"),
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"max_tokens": 0}, "max_tokens"),
    ("completions", {"extra_body": {"top_logprobs": 2}}, "top_logprobs"),
]


@pytest.mark.parametrize(("route", "extra", "param"), BAD, ids=[b[2] for b in BAD])
def test_unsupported_parameters_are_400_naming_them(client, route, extra, param) -> None:
    args = {"model": "pirate", "max_tokens": 2, **extra}
    with pytest.raises(BadRequestError) as caught:
        if route == "chat":
            client.chat.completions.create(messages=QUESTION, **args)
        else:
            client.completions.create(prompt=PROMPT, **args)
    assert caught.value.param == param, caught.value.body
    assert param.split(".")[0] in caught.value.message


def test_model_retrieve_and_ownership(client: OpenAI, server) -> None:
    listed = {m.id: m for m in client.models.list().data}
    pirate = client.models.retrieve("pirate")
    assert pirate.id == "pirate" and pirate.owned_by == listed["pirate"].owned_by
    assert pirate.created == listed["pirate"].created > 0
    base = client.models.retrieve(server.base)
    assert base.owned_by == "loraplex" and base.created > 0
    with pytest.raises(NotFoundError):
        client.models.retrieve("no-such-adapter")


def test_langchain_streams_an_adapter_answer(server, client: OpenAI) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="pirate",
        base_url=server.url + "/v1",
        api_key="unused",
        temperature=0,
        max_tokens=16,
        max_retries=0,
    )
    chunks = list(llm.stream(QUESTION[0]["content"]))
    assert len(chunks) > 2
    expected = client.chat.completions.create(
        model="pirate", messages=QUESTION, max_tokens=16, temperature=0
    )
    assert "".join(c.content for c in chunks) == expected.choices[0].message.content
