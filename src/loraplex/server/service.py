"""Serving one request: resolve ``model`` for the caller, admit it, load its adapter, generate.

Routes parse HTTP; this module decides which weights serve the request, holds it to its
tenant's limits and its fair share of the engine, and counts usage and metrics. An unknown
adapter is a 404, never a base-model answer; so is another tenant's adapter, with the same body
so that names do not leak. A base fallback happens only where the adapter's policy allows it,
and is labelled. A dead engine is never a reason to fall back: it is a 503.

Every request has a deadline (``request_timeout_seconds``, from admission) over its adapter load
and its generation; a drain that runs out of time stops what is left with ``stop_all``.
Generation feeds the ``ProgressTracker`` that ``/health`` reads.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from loraplex.adapters import AdapterSource, MayUse, ResolvedAdapter, anyone, unknown_model
from loraplex.config import Settings
from loraplex.engine.types import Delta, Engine, GenerationParams
from loraplex.errors import DeadlineExceeded, IncompatibleAdapter, NotFound, Unavailable
from loraplex.server.admission import FairAdmission
from loraplex.server.auth import Caller
from loraplex.server.limits import Reservation, TenantLimits
from loraplex.server.liveness import ProgressTracker
from loraplex.server.metrics import Metrics
from loraplex.server.prompts import PromptBuilder
from loraplex.server.request_context import current
from loraplex.server.usage import UsageRecorder

#: Threads for ``AdapterSource.resolve`` (a lookup, maybe a download): its own, so that slow
#: downloads never hold the default executor's few threads (CPUs + 4), which key lookups,
#: ``/ready`` and usage writes run on.
RESOLVE_THREADS = 16


@dataclass(frozen=True)
class Target:
    """What serves a request: an adapter version, or the base model."""

    adapter: ResolvedAdapter | None
    label: str  # value of x-loraplex-adapter
    fallback: bool = False


@dataclass
class Lease:
    """An admitted request's hold on its tenant's limits and on engine seats.

    ``release`` (idempotent) frees both and records the request's usage.
    """

    service: Service
    caller: Caller
    reservation: Reservation
    seats: int
    deadline: float  # event-loop time by which the request must be done
    adapter: str | None = None  # the version it was admitted for (None: the base model)
    label: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    released: bool = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.service.admission.release(self.caller.tenant, self.seats, self.adapter)
        self.reservation.release(self.prompt_tokens + self.completion_tokens)
        if self.label:
            self.service.usage.record(
                self.caller.tenant, self.label, self.prompt_tokens, self.completion_tokens
            )


def new_request_id(prefix: str) -> str:
    """A unique id; never derived from the prompt (identical prompts must not collide)."""
    return f"{prefix}-{uuid.uuid4().hex}"


class Service:
    """Resolution, admission, adapter loading and generation with metrics and usage."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        source: AdapterSource,
        prompts: PromptBuilder,
        metrics: Metrics,
        usage: UsageRecorder,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.source = source
        self._resolver = ThreadPoolExecutor(RESOLVE_THREADS, thread_name_prefix="resolve")
        self.prompts = prompts
        self.metrics = metrics
        self.usage = usage
        self.limits = TenantLimits()
        capacity = settings.max_engine_sequences or settings.max_num_seqs
        reserve = settings.reserved_sequences
        self.admission = FairAdmission(
            capacity,
            settings.tenant_queue_size,
            settings.queue_timeout_seconds,
            reserve=capacity // 8 if reserve is None else reserve,
            shared=settings.shared_sequences,
            idle=settings.tenant_idle_seconds,
            lend=capacity // 4 if settings.lend_sequences is None else settings.lend_sequences,
            slots=settings.max_loras if settings.adapter_wait_seconds else None,
            adapter_wait=settings.adapter_wait_seconds,
            grace=settings.seat_grace_seconds,
        )
        self.progress = ProgressTracker()
        self.started = int(time.time())  # the base model's ``created`` in /v1/models
        self._timeouts: set[asyncio.Timeout] = set()
        self._stop_reason: str | None = None

    @property
    def base_name(self) -> str:
        """The name clients use for the base model."""
        return self.settings.served_model_name

    async def resolve(self, model: str, caller: Caller) -> ResolvedAdapter | None:
        """The adapter version ``model`` names for ``caller`` (None: the base model), or 404."""
        record = current()
        if record is not None:
            record.tenant, record.model = caller.tenant, model
        if model == self.base_name:
            return None
        try:
            held = self.source.resolve_held(model, caller.may_use)
            if held is not None:  # no thread: slow downloads may hold every resolve thread
                return held
            return await self.resolve_source(model, caller.may_use)
        except NotFound:
            if caller.sees_everything:
                raise
            raise unknown_model(model) from None  # one body: names of others must not leak

    async def resolve_source(self, model: str, may_use: MayUse = anyone) -> ResolvedAdapter:
        """``source.resolve`` on the service's resolve threads (``RESOLVE_THREADS``)."""
        call = functools.partial(self.source.resolve, model, may_use)
        context = contextvars.copy_context()  # as ``asyncio.to_thread``: logs keep the request
        return await asyncio.get_running_loop().run_in_executor(self._resolver, context.run, call)

    def close(self) -> None:
        """Stop the resolve threads (a download under way ends at its own deadline)."""
        self._resolver.shutdown(wait=False, cancel_futures=True)

    async def admit(
        self,
        caller: Caller,
        prompt_ids: list[list[int]],
        params: list[GenerationParams],
        adapter: ResolvedAdapter | None = None,
    ) -> Lease:
        """Hold the request to its tenant's limits, then wait for its fair turn (429s);
        requests of an ``adapter`` already in the engine may go first (grouping)."""
        pairs = zip(prompt_ids, params, strict=True)
        tokens = sum((len(ids) + p.max_tokens) * p.n for ids, p in pairs)
        seats = sum(p.n for p in params)
        record = current()
        if record is not None and self.settings.log_prompts:
            record.prompt = self.prompts.tokenizer.decode(prompt_ids[0])
        reservation = await self.limits.acquire(caller, tokens)
        version = adapter.version if adapter is not None else None
        waited = time.perf_counter()
        try:
            seats = await self.admission.acquire(
                caller.tenant, caller.weight, seats, tokens, version
            )
        except BaseException:
            reservation.release(0)
            raise
        if record is not None:
            record.queue_wait = time.perf_counter() - waited
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_seconds
        return Lease(self, caller, reservation, seats, deadline, version)

    def stop_all(self, reason: str) -> None:
        """Stop every load and generation in progress, and any later one, with 503 ``reason``."""
        self._stop_reason = reason
        now = asyncio.get_running_loop().time()
        for timeout in list(self._timeouts):
            timeout.reschedule(now)

    @asynccontextmanager
    async def _within(self, deadline: float) -> AsyncIterator[None]:
        """Run a step until ``deadline`` (504 past it), or until ``stop_all`` (503)."""
        if self._stop_reason is not None:
            raise Unavailable(self._stop_reason, retry_after=1)
        timeout = asyncio.timeout_at(deadline)
        try:
            async with timeout:
                self._timeouts.add(timeout)
                try:
                    yield
                finally:
                    self._timeouts.discard(timeout)
        except TimeoutError:
            if not timeout.expired():
                raise
            if self._stop_reason is not None:
                raise Unavailable(self._stop_reason, retry_after=1) from None
            raise DeadlineExceeded(
                f"The request ran past its {self.settings.request_timeout_seconds:.0f} s "
                "deadline and was stopped; ask for fewer tokens, or raise "
                "--request-timeout-seconds."
            ) from None

    async def target(
        self, adapter: ResolvedAdapter | None, deadline: float | None = None
    ) -> Target:
        """Make the adapter resident, or fall back to the base where its policy allows.

        ``deadline`` (event-loop time) defaults to the request timeout from now. A load that
        failed because the engine is dead is a 503, never a fallback.
        """
        if adapter is None:
            return Target(None, self.base_name)
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_seconds
        started = time.perf_counter()
        try:
            async with self._within(deadline):
                hit = await self.engine.load(adapter)
        except (IncompatibleAdapter, Unavailable):
            await self.engine.check_health()
            if not adapter.fallback_to_base:
                raise
            self.metrics.fallbacks.labels(self.metrics.adapter(adapter.name)).inc()
            record = current()
            if record is not None:
                record.fallback = True
            return Target(None, self.base_name, fallback=True)
        seconds = time.perf_counter() - started + adapter.fetch_seconds
        tier = self.metrics.record_lookup(hit, seconds, fetched=adapter.fetch_seconds > 0)
        record = current()
        if record is not None:
            record.load_tier = tier
        return Target(adapter, adapter.version)

    async def generate(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        request_id: str,
        target: Target,
        lease: Lease,
    ) -> AsyncIterator[Delta]:
        """Stream deltas from the engine, recording tokens, TTFT, latency and usage."""
        label = target.label
        lease.label = label
        lease.prompt_tokens += len(prompt_ids) * params.n
        record = current()
        if record is not None:
            record.adapter = label
            record.prompt_tokens += len(prompt_ids) * params.n
        adapter = self.metrics.adapter(label)
        tenant = self.metrics.tenant(lease.caller.tenant)
        started = last = time.perf_counter()
        first = True
        self.metrics.in_flight.inc()
        self.metrics.prompt_tokens.labels(tenant, adapter).inc(len(prompt_ids) * params.n)
        self.progress.started()
        try:
            async with self._within(lease.deadline):
                deltas = self.engine.stream(prompt_ids, params, request_id, target.adapter)
                async for delta in deltas:
                    self.progress.progressed()
                    if delta.token_count:
                        now = time.perf_counter()
                        if first:  # from the request's arrival when known
                            since = started if record is None else record.started
                            self.metrics.ttft.labels(adapter).observe(now - since)
                            if record is not None:
                                record.first_token()
                            first = False
                        else:
                            gap = (now - last) / delta.token_count
                            self.metrics.inter_token.labels(adapter).observe(gap)
                        last = now
                    lease.completion_tokens += delta.token_count
                    if record is not None:
                        record.completion_tokens += delta.token_count
                    self.metrics.completion_tokens.labels(tenant, adapter).inc(delta.token_count)
                    yield delta
        finally:
            self.progress.finished()
            self.metrics.in_flight.dec()
            self.metrics.latency.labels(adapter).observe(time.perf_counter() - started)
