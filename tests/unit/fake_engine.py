"""A fake ``Engine`` for route tests: no model, no vLLM, predictable replies.

Each choice of a request is "hello from <adapter version or base>", one word per delta, cut at
``max_tokens`` (finish ``length``) or complete (finish ``stop``). Tests make it fail on purpose
through ``load_errors`` (by adapter name), ``stream_error`` (raised after ``fail_after``
deltas) and ``health_error``, hold streams open with ``gate`` (each waits for it before its
first delta), and read back what it was asked. Imported by conftest.py only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from loraplex.adapters import ResolvedAdapter
from loraplex.engine.types import Delta, EngineStats, GenerationParams
from loraplex.errors import LoraplexError


def reply_words(adapter: ResolvedAdapter | None) -> list[str]:
    """The full reply to a request served by ``adapter`` (None: the base model)."""
    return ["hello", " from", f" {adapter.version if adapter else 'base'}"]


@dataclass
class Generation:
    """One call to ``stream``."""

    prompt_ids: list[int]
    params: GenerationParams
    request_id: str
    adapter: ResolvedAdapter | None


@dataclass
class FakeEngine:
    """Satisfies ``loraplex.engine.types.Engine``; records calls, fails when told to."""

    load_errors: dict[str, LoraplexError] = field(default_factory=dict)
    stream_error: LoraplexError | None = None
    fail_after: int = 0
    health_error: LoraplexError | None = None
    gate: asyncio.Event | None = None
    generations: list[Generation] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)
    resident: dict[str, str] = field(default_factory=dict)
    stopped: bool = False
    engine_stats: EngineStats = field(default_factory=EngineStats)

    async def stream(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        request_id: str,
        adapter: ResolvedAdapter | None,
    ) -> AsyncIterator[Delta]:
        self.generations.append(Generation(prompt_ids, params, request_id, adapter))
        if self.gate is not None:
            await self.gate.wait()
        words = reply_words(adapter)
        kept = words[: params.max_tokens]
        finish = "stop" if len(kept) == len(words) else "length"
        sent = 0
        for index in range(params.n):
            for i, word in enumerate(kept):
                if self.stream_error is not None and sent == self.fail_after:
                    raise self.stream_error
                yield Delta(index, word, 1, finish if i == len(kept) - 1 else None)
                sent += 1

    async def load(self, adapter: ResolvedAdapter) -> bool:
        if adapter.name in self.load_errors:
            raise self.load_errors[adapter.name]
        self.loads.append(adapter.version)
        hit = adapter.version in self.resident
        self.resident.setdefault(adapter.version, "cpu")
        return hit

    async def unload(self, adapter: ResolvedAdapter) -> int:
        self.resident.pop(adapter.version, None)
        return 0

    async def pin(self, adapter: ResolvedAdapter) -> None:
        await self.load(adapter)
        self.resident[adapter.version] = "pinned"

    async def check_health(self) -> None:
        if self.health_error is not None:
            raise self.health_error

    def residency(self) -> dict[str, str]:
        return dict(self.resident)

    async def residency_and_engine(self) -> tuple[dict[str, str], list[str]]:
        return dict(self.resident), sorted(self.resident)

    def failed_loads(self) -> list[dict[str, object]]:
        return []

    def unfinished_requests(self) -> int:
        return 0

    def stats(self) -> EngineStats:
        return self.engine_stats

    async def refresh_stats(self) -> None:
        pass

    def shutdown(self) -> None:
        self.stopped = True
