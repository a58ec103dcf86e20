"""Sends the benchmark load and times every request, token by token.

Closed loop: ``concurrency`` workers, each sending its next request when the last one ends.
Open loop: requests arrive as a Poisson process of ``rate`` per second, however slow the
server is. Every request is streamed, so time to first token and the gaps between streamed
chunks are measured; the client does not retry or fall back here (a failure is a result).
``/metrics`` is read before and after the measured part. Turning samples into figures is
``report``'s job.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loraplex.client.async_client import AsyncClient
from loraplex.client.bench.workload import PlannedRequest, Workload, load_prompts, poisson_gaps
from loraplex.client.errors import APIError
from loraplex.client.retry import RetryPolicy
from loraplex.client.types import adapter_names_from_models, base_model_from_models
from loraplex.errors import InvalidRequest, LoraplexError


@dataclass
class BenchConfig:
    """Everything ``loraplex bench`` can be told."""

    url: str
    concurrency: int | None = None
    rate: float | None = None
    requests: int | None = None
    duration: float | None = None
    adapters: int | None = None
    adapter_names: list[str] | None = None
    zipf: float = 1.0
    tenants: int = 1
    max_tokens: int = 64
    prompts: Path | None = None
    endpoint: Literal["completion", "chat"] = "completion"
    api_keys: list[str] | None = None
    base_model: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = False
    warmup: int = 0
    seed: int = 0
    timeout: float = 300.0
    progress: bool = True

    def validate(self) -> None:
        """Fill defaults and refuse contradictory settings."""
        if self.concurrency is not None and self.rate is not None:
            raise InvalidRequest("Give --concurrency (closed loop) or --rate (open), not both.")
        if self.rate is None and self.concurrency is None:
            self.concurrency = 8
        if self.concurrency is not None and self.concurrency < 1:
            raise InvalidRequest("--concurrency must be at least 1.")
        if self.requests is None and self.duration is None:
            self.requests = 100
        if self.requests is not None and self.requests < 1:
            raise InvalidRequest("--requests must be at least 1.")
        if self.duration is not None and self.duration <= 0:
            raise InvalidRequest("--duration must be > 0.")
        if self.max_tokens < 1:
            raise InvalidRequest("--max-tokens must be at least 1.")
        if self.api_keys and len(self.api_keys) > 1:
            if self.tenants == 1:
                self.tenants = len(self.api_keys)
            elif self.tenants != len(self.api_keys):
                raise InvalidRequest("Give one API key for all tenants or one per tenant.")

    @property
    def mode(self) -> str:
        return "open" if self.rate is not None else "closed"


@dataclass
class Sample:
    """One measured request. Times are seconds; ``start`` is from the start of the run."""

    index: int
    model: str
    tenant: str
    start: float = 0.0
    ttft: float | None = None
    latency: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    ok: bool = False
    status: int | None = None
    error: str | None = None
    adapter: str | None = None
    fell_back: bool = False


@dataclass
class RunResult:
    """Samples of the measured part plus what the server said before and after."""

    config: BenchConfig
    samples: list[Sample]
    wall_s: float
    started_at: float
    adapters: list[str]
    base_model: str | None
    metrics_before: str | None
    metrics_after: str | None


def _auth(key: str | None) -> dict[str, str] | None:
    return {"authorization": f"Bearer {key}"} if key else None


async def _listings(client: AsyncClient, keys: list[str] | None) -> list[dict[str, Any]]:
    """``GET /v1/models`` as each tenant sees it (one listing without keys)."""
    return [await client.models(headers=_auth(key)) for key in (keys or [None])]


def _round_robin(per_tenant: list[list[str]]) -> tuple[list[str], list[int]]:
    """Adapters interleaved across tenants (first of each, then second...), with owners."""
    names: list[str] = []
    owners: list[int] = []
    for row in range(max((len(n) for n in per_tenant), default=0)):
        for tenant, listed in enumerate(per_tenant):
            if row < len(listed) and listed[row] not in names:
                names.append(listed[row])
                owners.append(tenant)
    return names, owners


async def _resolve_models(
    client: AsyncClient, cfg: BenchConfig
) -> tuple[list[str], str | None, list[int] | None]:
    """Adapter names to use, the base model name, and each adapter's tenant (if known)."""
    base, names, owners = cfg.base_model, cfg.adapter_names, None
    if names is None or base is None:
        try:
            listings = await _listings(client, cfg.api_keys)
        except LoraplexError:
            if names is None or cfg.adapters == 0:
                raise
            listings = [{}]
        base = base or base_model_from_models(listings[0])
        if names is None:
            names, owners = _round_robin([adapter_names_from_models(x) for x in listings])
            if len(listings) == 1:
                owners = None
    wanted = len(names) if cfg.adapters is None else cfg.adapters
    if wanted < 0:
        raise InvalidRequest("--adapters must be >= 0.")
    if wanted > len(names):
        raise InvalidRequest(
            f"Asked for {wanted} adapters but only {len(names)} are known "
            f"({', '.join(names[:5])}{'...' if len(names) > 5 else ''}). "
            "Serve more adapters or pass --adapter-names."
        )
    if wanted == 0 and not base:
        raise InvalidRequest("Cannot tell the base model's name: pass --model.")
    return list(names[:wanted]), base, owners[:wanted] if owners else None


async def _scrape(client: AsyncClient) -> str | None:
    try:
        return await client.get_text("/metrics")
    except LoraplexError:
        return None


class Runner:
    """Runs one benchmark configuration against one server."""

    def __init__(self, cfg: BenchConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.client = AsyncClient(cfg.url, timeout=cfg.timeout, retry=RetryPolicy(max_retries=0))
        self._t0 = 0.0
        self._bar: Any = None

    def _params(self) -> dict[str, Any]:
        cfg = self.cfg
        params: dict[str, Any] = {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature}
        if self.cfg.ignore_eos:
            params["ignore_eos"] = True
        return params

    def _headers(self, tenant: str) -> dict[str, str] | None:
        keys = self.cfg.api_keys
        if not keys:
            return None
        return _auth(keys[0] if len(keys) == 1 else keys[int(tenant.rsplit("-", 1)[1])])

    async def one(self, plan: PlannedRequest) -> Sample:
        """Send one streamed request and time it."""
        sample = Sample(plan.index, plan.model, plan.tenant, start=time.perf_counter() - self._t0)
        t0 = time.perf_counter()
        chunks_with_text = 0
        try:
            stream = await self.client.stream(
                self.cfg.endpoint,
                plan.model,
                plan.payload,
                fallback=False,
                headers=self._headers(plan.tenant),
                **self._params(),
            )
            async for chunk in stream:
                if chunk.text:
                    now = time.perf_counter() - t0
                    sample.ttft = now if sample.ttft is None else sample.ttft
                    sample.chunk_times.append(now)
                    chunks_with_text += 1
            done = stream.completion
            sample.output_tokens = int(done.usage.get("completion_tokens") or chunks_with_text)
            sample.prompt_tokens = int(done.usage.get("prompt_tokens") or 0)
            sample.adapter, sample.fell_back = done.adapter, done.fell_back
            sample.ok = True
        except LoraplexError as exc:
            sample.status = exc.status_code if isinstance(exc, APIError) else None
            sample.error = f"{type(exc).__name__}: {exc}"[:300]
        sample.latency = time.perf_counter() - t0
        if self._bar is not None:
            self._bar.update(1)
        return sample

    async def _closed(
        self, workload: Workload, count: int | None, deadline: float | None, workers: int
    ) -> list[Sample]:
        samples: list[Sample] = []
        plans = iter(workload)
        issued = 0

        async def worker() -> None:
            nonlocal issued
            while (count is None or issued < count) and (
                deadline is None or time.perf_counter() < deadline
            ):
                issued += 1
                samples.append(await self.one(next(plans)))

        await asyncio.gather(*(worker() for _ in range(workers)))
        return samples

    async def _open(self, workload: Workload) -> list[Sample]:
        cfg, tasks = self.cfg, []
        plans, gaps = iter(workload), poisson_gaps(float(cfg.rate or 1), cfg.seed)
        at = 0.0
        while cfg.requests is None or len(tasks) < cfg.requests:
            at += next(gaps)
            if cfg.duration is not None and at > cfg.duration:
                break
            await asyncio.sleep(max(0.0, self._t0 + at - time.perf_counter()))
            tasks.append(asyncio.create_task(self.one(next(plans))))
        return list(await asyncio.gather(*tasks))

    async def run(self) -> RunResult:
        """Warm up, then run the measured part; always closes the connection pool."""
        cfg = self.cfg
        try:
            adapters, base, owners = await _resolve_models(self.client, cfg)
            workload = Workload(
                adapters=adapters,
                base_model=base,
                zipf_s=cfg.zipf,
                tenants=cfg.tenants,
                prompts=load_prompts(cfg.prompts, cfg.endpoint),
                seed=cfg.seed,
                owners=owners,
            )
            if cfg.warmup:
                self._t0 = time.perf_counter()
                workers = min(cfg.warmup, cfg.concurrency or 8)
                await self._closed(workload, cfg.warmup, None, workers)
            before = await _scrape(self.client)
            if cfg.progress:
                from tqdm import tqdm

                self._bar = tqdm(total=cfg.requests, unit="req", desc="bench", leave=False)
            started_at = time.time()
            self._t0 = time.perf_counter()
            if cfg.mode == "closed":
                deadline = None if cfg.duration is None else self._t0 + cfg.duration
                samples = await self._closed(workload, cfg.requests, deadline, cfg.concurrency or 1)
            else:
                samples = await self._open(workload)
            wall = time.perf_counter() - self._t0
            after = await _scrape(self.client)
        finally:
            if self._bar is not None:
                self._bar.close()
            await self.client.close()
        samples.sort(key=lambda s: s.index)
        return RunResult(cfg, samples, wall, started_at, adapters, base, before, after)


def run_bench(cfg: BenchConfig) -> RunResult:
    """Run one benchmark to completion (blocking)."""
    return asyncio.run(Runner(cfg).run())
