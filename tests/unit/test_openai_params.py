"""OpenAI parameters (issue 13) without an engine: logprobs shapes, request validation, and
the 400 body naming the parameter. The integration tests drive the same through the SDK."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest
from pydantic import ValidationError
from route_checks import BASE, assert_error, chat

from loraplex.engine.types import TokenLogprob
from loraplex.engine.vllm_engine import token_logprobs
from loraplex.errors import InvalidRequest
from loraplex.server.logprobs import ChoiceLogprobs, chat_logprobs
from loraplex.server.schemas import ChatCompletionRequest, CompletionRequest


def test_vllm_logprobs_become_ranked_alternatives() -> None:
    def lp(logprob: float, rank: int, text: str) -> SimpleNamespace:
        return SimpleNamespace(logprob=logprob, rank=rank, decoded_token=text)

    entry = {7: lp(-3.0, 4, " b"), 1: lp(-0.1, 1, " a"), 2: lp(float("-inf"), 2, " c")}
    (token,) = token_logprobs([7], [entry])
    assert token == TokenLogprob(" b", -3.0, ((" a", -0.1), (" c", -9999.0), (" b", -3.0)))


def test_completion_logprobs_offsets_run_across_chunks() -> None:
    first = TokenLogprob("Hi", None)
    there = TokenLogprob(" there", -0.5, ((" there", -0.5), (" you", -1.5)))
    choice = ChoiceLogprobs()
    assert choice.shape([first, there]) == {
        "tokens": ["Hi", " there"],
        "token_logprobs": [None, -0.5],
        "top_logprobs": [None, {" there": -0.5, " you": -1.5}],
        "text_offset": [0, 2],
    }
    assert choice.shape([TokenLogprob("!", -1.0, (("!", -1.0),))])["text_offset"] == [8]


def test_chat_logprobs_keep_exactly_top_alternatives() -> None:
    token = TokenLogprob("é", -0.2, (("é", -0.2), ("e", -2.0), ("x", -5.0)))
    shaped = chat_logprobs([token], 2)
    assert shaped["refusal"] is None
    (item,) = shaped["content"]
    assert item["bytes"] == [0xC3, 0xA9]
    assert [alt["token"] for alt in item["top_logprobs"]] == ["é", "e"]
    assert chat_logprobs([token], 0)["content"][0]["top_logprobs"] == []


def test_prompts_of_every_openai_form() -> None:
    def prompts(prompt):
        return CompletionRequest(model="m", prompt=prompt).prompts()

    assert prompts("a") == ["a"]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([1, 2]) == [[1, 2]]
    assert prompts([[1, 2], [3]]) == [[1, 2], [3]]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"store": True}, "store"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages.name"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "s", "schema": {"type": 1}},
                }
            },
            "response_format.json_schema.schema",
        ),
    ],
)
def test_chat_values_loraplex_cannot_honour_name_their_parameter(fields, param) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], **fields}
    with pytest.raises(InvalidRequest) as caught:
        ChatCompletionRequest(**body)
    assert caught.value.param == param


def test_accepted_chat_parameters() -> None:
    request = ChatCompletionRequest(
        model="m",
        messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": "x"}],
        logprobs=True,
        top_logprobs=20,
        tool_choice="none",
        parallel_tool_calls=False,
        user="u1",
        response_format={"type": "json_object"},
    )
    assert request.messages[0].template_role == "system"
    assert request.json_format() is True
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], foo=1)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"suffix": "s"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 0, "echo": True, "stream": True}, "max_tokens"),
    ],
)
def test_completion_values_name_their_parameter(fields, param) -> None:
    with pytest.raises(InvalidRequest) as caught:
        CompletionRequest(model="m", prompt="p", **fields)
    assert caught.value.param == param
    assert CompletionRequest(model="m", prompt="p", max_tokens=0, echo=True).scoring_only


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("extra", "param"),
    [({"frobnicate": 1}, "frobnicate"), ({"top_logprobs": 50, "logprobs": True}, "top_logprobs")],
)
async def test_the_400_body_names_the_parameter(client: httpx.AsyncClient, extra, param) -> None:
    response = await client.post("/v1/chat/completions", json=chat(BASE, **extra))
    assert_error(response, 400, "invalid_request")
    assert response.json()["error"]["param"] == param


@pytest.mark.anyio
async def test_model_retrieve(client: httpx.AsyncClient) -> None:
    listed = (await client.get("/v1/models")).json()["data"]
    sales = next(m for m in listed if m["id"] == "sales")
    assert sales["owned_by"] == "loraplex" and sales["created"] > 0
    assert (await client.get("/v1/models/sales")).json() == sales
    assert (await client.get(f"/v1/models/{BASE}")).json()["parent"] is None
    assert_error(await client.get("/v1/models/nobody"), 404, "model_not_found")
