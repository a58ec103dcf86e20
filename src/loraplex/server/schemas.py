"""Request bodies of the OpenAI-compatible routes (pydantic), validated before any work.

Every documented OpenAI parameter is declared: it either works, or a value that would need
what loraplex does not do (tools, audio, ``suffix``...) is a 400 naming it. A field that is
neither an OpenAI parameter nor a documented extension (``ignore_eos``, ``top_k``...) is a
400 naming it too, so nothing a client asks for is dropped without a word (docs/openai.md
lists them all). Bounds here turn nonsense into a 400, not an engine error.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loraplex.errors import InvalidRequest

GREEDY_BELOW = 1e-5
"""vLLM samples greedily (one answer) at temperatures below this."""

MAX_TOP_LOGPROBS = 20
"""OpenAI's bound on ``top_logprobs``; ``max_logprobs`` (a setting) may lower it."""


def unsupported(param: str, why: str) -> InvalidRequest:
    """The 400 for a parameter whose value loraplex cannot honour."""
    return InvalidRequest(f"{param}: {why}", param=param)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    """``stream_options``: usage at the end of a stream."""

    include_usage: bool = False
    include_obfuscation: bool = False  # accepted: loraplex streams carry no obfuscation


class _Sampling(_Strict):
    model: str = Field(min_length=1, max_length=200)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)  # the server's cap (max_n) is checked with the others
    # extensions (vLLM's names, sent by vLLM's benchmark client among others)
    ignore_eos: bool = False  # generate max_tokens even past EOS
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    top_k: int = Field(0, ge=-1)  # 0 or -1: every token
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # the end user's id, for the caller's own records

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias_bounds(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        if value and any(not -100 <= bias <= 100 for bias in value.values()):
            raise ValueError("biases lie between -100 and 100")
        return value

    @model_validator(mode="after")
    def _checked(self) -> Self:
        if self.n > 1 and self.temperature < GREEDY_BELOW:
            raise unsupported(
                "n", "n > 1 needs a temperature above 0 (greedy sampling has one answer)"
            )
        if self.stream_options is not None and not self.stream:
            raise unsupported("stream_options", "only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        """``stop`` as a list (the validator already normalised it)."""
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: Prompt
    max_tokens: int = Field(16, ge=0)  # 0: with echo, score the prompt only
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_checks(self) -> Self:
        if self.best_of is not None and self.best_of != self.n:
            raise unsupported("best_of", "only best_of equal to n (the default) is supported")
        if self.suffix:
            raise unsupported("suffix", "insertion (suffix) is not supported")
        if self.max_tokens == 0 and not self.echo:
            raise unsupported("max_tokens", "0 is allowed only with echo (prompt scoring)")
        if self.max_tokens == 0 and self.stream:
            raise unsupported("max_tokens", "0 (prompt scoring) is not streamed")
        if not self.prompts():
            raise unsupported("prompt", "must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s): each a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(t, int) for t in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    @property
    def scoring_only(self) -> bool:
        """``echo`` with ``max_tokens=0``: the prompt's logprobs, nothing generated."""
        return self.echo and self.max_tokens == 0


class ChatMessage(_Strict):
    """One chat message; content may be a string or OpenAI text parts."""

    role: Literal["developer", "system", "user", "assistant"]
    content: str | list[dict[str, str]] | None = None
    name: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _checked(self) -> Self:
        if self.name:
            raise unsupported("messages.name", "participant names are not supported")
        if self.content is None:
            raise unsupported("messages.content", "every message needs content")
        return self

    def text(self) -> str:
        """The message content as plain text (text parts joined)."""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content or []:
            if part.get("type") != "text" or "text" not in part:
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)

    @property
    def template_role(self) -> str:
        """The role the chat template knows (``developer`` is the newer ``system``)."""
        return "system" if self.role == "developer" else self.role


class JsonSchema(_Strict):
    """``response_format.json_schema``."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """``response_format``: free text, any JSON object, or JSON valid under a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _checked(self) -> Self:
        if self.type == "json_schema":
            if self.json_schema is None:
                raise unsupported("response_format.json_schema", "required for type json_schema")
            _check_schema(self.json_schema.schema_)
        return self


def _check_schema(schema: dict[str, Any]) -> None:
    """400 for a schema that is not valid JSON Schema."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
        json.dumps(schema)
    except (jsonschema.SchemaError, TypeError, ValueError) as exc:
        message = getattr(exc, "message", str(exc))
        raise unsupported(
            "response_format.json_schema.schema", f"not a valid JSON schema: {message}"
        ) from None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    # accepted, changing nothing: loraplex stores nothing and caches prompts per tenant itself
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    parallel_tool_calls: bool | None = None  # meaningful only with tools, which are refused
    # refused unless empty or off: features loraplex does not have
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chat_checks(self) -> Self:
        if self.store:
            raise unsupported("store", "loraplex does not store completions")
        if self.service_tier not in (None, "auto", "default"):
            raise unsupported("service_tier", "only auto or default")
        if self.top_logprobs and not self.logprobs:
            raise unsupported("top_logprobs", "needs logprobs set to true")
        for param in ("tools", "functions"):
            if getattr(self, param):
                raise unsupported(param, "tool and function calling are not supported")
        for param in ("tool_choice", "function_call"):
            if getattr(self, param) not in (None, "none"):
                raise unsupported(param, "tool and function calling are not supported")
        if self.modalities not in (None, ["text"]):
            raise unsupported("modalities", "only text")
        for param in ("audio", "prediction", "reasoning_effort", "verbosity"):
            if getattr(self, param) is not None:
                raise unsupported(param, "not supported by this server")
        if self.web_search_options is not None:
            raise unsupported("web_search_options", "web search is not supported")
        return self

    def token_budget(self) -> int | None:
        """The completion token limit the client asked for, if any."""
        return self.max_completion_tokens or self.max_tokens

    def json_format(self) -> dict[str, Any] | bool | None:
        """The JSON schema output must follow, True for any JSON object, None for text."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return True
        assert fmt.json_schema is not None  # the validator required it
        return fmt.json_schema.schema_


class GenerateRequest(BaseModel):
    """``POST /generate``: a prompt and an optional adapter name, outside the OpenAI format."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    lora_name: str | None = None
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
