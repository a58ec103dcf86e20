"""What the server asks of an engine: the ``Engine`` protocol and its value types.

The real implementation is ``loraplex.engine.vllm_engine.VllmEngine``; unit tests may use a
fake that satisfies the same protocol. Nothing here imports vLLM.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from loraplex.adapters import ResolvedAdapter


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings of one request (OpenAI names)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False
    cache_salt: str | None = None  # prefix-cache namespace: one per tenant
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # alternatives per generated token (0: the chosen one only)
    prompt_logprobs: int | None = None  # the same for every prompt token (echo, scoring)
    json_format: dict[str, Any] | bool | None = None  # a JSON schema; True: any JSON object


@dataclass(frozen=True)
class TokenLogprob:
    """One token with its log-probability and the most likely alternatives at its place."""

    token: str
    logprob: float | None  # None: the prompt's first token (nothing comes before it)
    top: tuple[tuple[str, float], ...] = ()  # most likely first; the chosen token included


@dataclass(frozen=True)
class Delta:
    """New text of one choice since the last delta; ``finish_reason`` set on its last one."""

    index: int
    text: str
    token_count: int
    finish_reason: str | None = None
    cached_tokens: int = 0  # prompt tokens this request found in the prefix cache
    logprobs: tuple[TokenLogprob, ...] | None = None  # of this delta's tokens, when asked
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # first delta only, when asked


@dataclass
class EngineStats:
    """What the engine reports about its scheduler and adapter cache (for /metrics)."""

    running: int = 0  # sequences generating
    waiting: int = 0  # sequences queued in the engine
    kv_cache_usage: float = 0.0  # fraction of the KV cache in use
    evictions: int = 0  # adapter versions evicted to make room for others, since start
    hot_merged: str | None = None  # the version served merged into the base weights now
    hot_merges: int = 0  # hot-adapter merges since start (merge_hot on)
    hot_unmerges: int = 0


class Engine(Protocol):
    """The operations the server uses."""

    def stream(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        request_id: str,
        adapter: ResolvedAdapter | None,
    ) -> AsyncIterator[Delta]:
        """Generate, yielding text deltas; loads the adapter first if needed."""
        ...

    async def load(self, adapter: ResolvedAdapter) -> bool:
        """Make the adapter resident; True if it was already loaded (a cache hit)."""
        ...

    async def unload(self, adapter: ResolvedAdapter) -> int:
        """Drop the adapter from the engine's caches once its streams end; returns how many
        streams are still in flight on it (0: it is gone already)."""
        ...

    async def pin(self, adapter: ResolvedAdapter) -> None:
        """Load the adapter and keep it from being evicted (``Conflict`` beyond the pin bound)."""
        ...

    async def check_health(self) -> None:
        """Raise if the engine cannot serve."""
        ...

    def residency(self) -> dict[str, str]:
        """Version -> where it lives now ("cpu", "pinned", "unloading")."""
        ...

    async def residency_and_engine(self) -> tuple[dict[str, str], list[str]]:
        """``residency`` and the versions the engine itself reports loaded, read together
        (no load or unload between the two), so they can be compared."""
        ...

    def failed_loads(self) -> list[dict[str, object]]:
        """Versions that failed to load and are refused for now, with why."""
        ...

    def unfinished_requests(self) -> int:
        """Requests the engine holds now (queued or generating)."""
        ...

    def stats(self) -> EngineStats:
        """Scheduler state, adapter evictions and hot merges, for /metrics."""
        ...

    async def refresh_stats(self) -> None:
        """Update what ``stats`` reports that the engine tells only when asked (a scrape)."""
        ...

    def shutdown(self) -> None:
        """Stop the engine and its worker processes."""
        ...
