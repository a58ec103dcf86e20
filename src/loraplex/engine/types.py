"""What the server asks of an engine: the ``Engine`` protocol and its value types.

The real implementation is ``loraplex.engine.vllm_engine.VllmEngine``; unit tests may use a
fake that satisfies the same protocol. Nothing here imports vLLM.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

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


@dataclass(frozen=True)
class Delta:
    """New text of one choice since the last delta; ``finish_reason`` set on its last one."""

    index: int
    text: str
    token_count: int
    finish_reason: str | None = None
    cached_tokens: int = 0  # prompt tokens this request found in the prefix cache


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

    async def engine_adapters(self) -> list[str]:
        """The versions the engine itself reports loaded (to compare with ``residency``)."""
        ...

    def failed_loads(self) -> list[dict[str, object]]:
        """Versions that failed to load and are refused for now, with why."""
        ...

    def unfinished_requests(self) -> int:
        """Requests the engine holds now (queued or generating)."""
        ...

    def shutdown(self) -> None:
        """Stop the engine and its worker processes."""
        ...
