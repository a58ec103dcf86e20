"""Request bodies of the OpenAI-compatible routes (pydantic), validated before any work.

Only fields loraplex honours are declared; unknown OpenAI fields are accepted and ignored,
as OpenAI clients send many of them. Bounds here turn nonsense into a 400, not an engine error.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

GREEDY_BELOW = 1e-5
"""vLLM samples greedily (one answer) at temperatures below this."""


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)  # the server's cap (max_n) is checked with the others
    ignore_eos: bool = False  # vLLM extension: generate max_tokens even past EOS (benchmarks)
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    @model_validator(mode="after")
    def _greedy_gives_one_choice(self) -> Self:
        if self.n > 1 and self.temperature < GREEDY_BELOW:
            raise ValueError("n > 1 needs a temperature above 0 (greedy sampling has one answer)")
        return self

    def stop_list(self) -> list[str]:
        """``stop`` as a list (the validator already normalised it)."""
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)

    def prompts(self) -> list[str]:
        """The prompt(s) as a list of one or more strings."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatMessage(BaseModel):
    """One chat message; content may be a string or OpenAI text parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, str]]

    def text(self) -> str:
        """The message content as plain text (text parts joined)."""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or "text" not in part:
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def token_budget(self) -> int | None:
        """The completion token limit the client asked for, if any."""
        return self.max_completion_tokens or self.max_tokens


class GenerateRequest(BaseModel):
    """``POST /generate``: a prompt and an optional adapter name, outside the OpenAI format."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    lora_name: str | None = None
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
