"""Serving one request: resolve ``model``, load its adapter, generate, count.

Routes parse HTTP; this module decides which weights serve the request and keeps metrics.
An unknown adapter is a 404, never a base-model answer; a base fallback happens only where
the adapter's policy allows it, and is labelled.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from loraplex.adapters import AdapterSource, ResolvedAdapter
from loraplex.config import Settings
from loraplex.engine.types import Delta, Engine, GenerationParams
from loraplex.errors import IncompatibleAdapter, Unavailable
from loraplex.server.metrics import Metrics
from loraplex.server.prompts import PromptBuilder


@dataclass(frozen=True)
class Target:
    """What serves a request: an adapter version, or the base model."""

    adapter: ResolvedAdapter | None
    label: str  # value of x-loraplex-adapter
    fallback: bool = False


def new_request_id(prefix: str) -> str:
    """A unique id; never derived from the prompt (identical prompts must not collide)."""
    return f"{prefix}-{uuid.uuid4().hex}"


class Service:
    """Resolution, adapter loading and generation with metrics."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        source: AdapterSource,
        prompts: PromptBuilder,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.source = source
        self.prompts = prompts
        self.metrics = metrics

    @property
    def base_name(self) -> str:
        """The name clients use for the base model."""
        return self.settings.served_model_name

    async def target(self, model: str) -> Target:
        """Resolve ``model`` and make its adapter resident (404 if unknown)."""
        if model == self.base_name:
            return Target(None, self.base_name)
        adapter = await asyncio.to_thread(self.source.resolve, model)
        started = time.perf_counter()
        try:
            hit = await self.engine.load(adapter)
        except (IncompatibleAdapter, Unavailable):
            if not adapter.fallback_to_base:
                raise
            self.metrics.fallbacks.labels(adapter.name).inc()
            return Target(None, self.base_name, fallback=True)
        if hit:
            self.metrics.cache_hits.inc()
        else:
            self.metrics.cache_misses.inc()
            self.metrics.adapter_load_seconds.observe(time.perf_counter() - started)
        return Target(adapter, adapter.version)

    async def generate(
        self, prompt_ids: list[int], params: GenerationParams, request_id: str, target: Target
    ) -> AsyncIterator[Delta]:
        """Stream deltas from the engine, recording tokens, TTFT and latency."""
        label = target.label
        started = time.perf_counter()
        first = True
        self.metrics.in_flight.inc()
        self.metrics.prompt_tokens.labels(label).inc(len(prompt_ids) * params.n)
        try:
            async for delta in self.engine.stream(prompt_ids, params, request_id, target.adapter):
                if first and delta.token_count:
                    self.metrics.ttft.labels(label).observe(time.perf_counter() - started)
                    first = False
                self.metrics.completion_tokens.labels(label).inc(delta.token_count)
                yield delta
        finally:
            self.metrics.in_flight.dec()
            self.metrics.latency.labels(label).observe(time.perf_counter() - started)
