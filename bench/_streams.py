"""Streamed load of tenants, timed chunk by chunk: sequential requests and floods.

A ``Stream`` is one streamed ``/v1/completions`` request (``ignore_eos``, usage at the end).
A ``Flood`` keeps ``streams`` requests of one key in flight until stopped; a refused request
(429) waits its ``Retry-After`` and goes again, as a client that keeps flooding would. Tokens
inside a time window are counted from each request's usage spread evenly over its chunks (a
chunk may carry several tokens), so a window counts parts of requests; a request cut off by
``stop`` counts one token per chunk. Works against loraplex and vLLM's own server alike.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

PROMPT = "Write a long story about a lighthouse keeper and the sea"
BUSY_GAUGES = {
    "loraplex_requests_in_flight",  # loraplex: requests generating
    "vllm:num_requests_running",  # vLLM's own server
    "vllm:num_requests_waiting",
}


@dataclass
class Stream:
    """One request; times are ``time.perf_counter()`` seconds."""

    started: float
    chunks: list[float] = field(default_factory=list)
    tokens: int | None = None
    ended: float | None = None
    status: int | None = None
    error: str | None = None
    retry_after: float = 1.0

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.tokens is not None

    @property
    def failed(self) -> bool:
        """Ended without its completion (cut-off requests have not ended)."""
        return self.ended is not None and not self.ok

    def tokens_between(self, start: float, end: float) -> float:
        """Tokens of this request that arrived in ``[start, end)``."""
        if not self.chunks:
            return 0.0
        each = self.tokens / len(self.chunks) if self.tokens else 1.0
        return each * sum(start <= t < end for t in self.chunks)


class Load:
    """Streamed completions of the base model ``model`` at ``url``, one pool for all tenants."""

    def __init__(self, url: str, model: str, admin_key: str | None = None) -> None:
        self.model = model
        self.admin_key = admin_key
        self.client = httpx.AsyncClient(
            base_url=url,
            timeout=httpx.Timeout(900, connect=30),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=512),
        )
        self._numbers = itertools.count()

    async def close(self) -> None:
        await self.client.aclose()

    async def stream(
        self, key: str | None, max_tokens: int, into: list[Stream] | None = None
    ) -> Stream:
        """Send one request and time its chunks; ``into`` sees it from the start."""
        sample = Stream(time.perf_counter())
        if into is not None:
            into.append(sample)
        body = {
            "model": self.model,
            "prompt": f"{PROMPT} (number {next(self._numbers)}).",
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {"authorization": f"Bearer {key}"} if key else {}
        try:
            async with self.client.stream(
                "POST", "/v1/completions", json=body, headers=headers
            ) as response:
                sample.status = response.status_code
                if response.status_code != 200:
                    sample.error = (await response.aread()).decode(errors="replace")[:300]
                    sample.retry_after = float(response.headers.get("retry-after") or 1)
                else:
                    await _read_events(response, sample)
        except httpx.HTTPError as exc:
            sample.error = f"{type(exc).__name__}: {exc}"[:300]
        sample.ended = time.perf_counter()
        return sample

    async def sequential(
        self, key: str | None, max_tokens: int, count: int, min_seconds: float = 0.0
    ) -> list[Stream]:
        """``count`` requests one after another, more until ``min_seconds`` have passed."""
        samples: list[Stream] = []
        start = time.perf_counter()
        while len(samples) < count or time.perf_counter() - start < min_seconds:
            await self.stream(key, max_tokens, samples)
        return samples

    async def busy(self) -> float | None:
        """Requests the server reports in progress (None: it does not say)."""
        headers = {"authorization": f"Bearer {self.admin_key}"} if self.admin_key else {}
        try:
            response = await self.client.get("/metrics", headers=headers, timeout=10)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        values = [
            s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples
            if s.name in BUSY_GAUGES
        ]
        return sum(values) if values else None

    async def wait_idle(self, timeout: float = 180.0) -> bool:
        """Until the server reports nothing in progress twice in a row (or cannot tell)."""
        deadline = time.perf_counter() + timeout
        quiet_polls = 0
        while time.perf_counter() < deadline:
            busy = await self.busy()
            if busy is None:
                return True
            quiet_polls = quiet_polls + 1 if busy == 0 else 0
            if quiet_polls >= 2:
                return True
            await asyncio.sleep(0.5)
        return False


async def _read_events(response: httpx.Response, sample: Stream) -> None:
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            sample.error = json.dumps(event["error"])[:300]
            return
        if event.get("usage"):
            sample.tokens = int(event["usage"]["completion_tokens"])
        if any(choice.get("text") for choice in event.get("choices") or []):
            sample.chunks.append(time.perf_counter())


class Flood:
    """``streams`` concurrent requests of one key, each replaced when it ends, until stopped."""

    def __init__(self, load: Load, key: str | None, streams: int, max_tokens: int) -> None:
        self.load, self.key, self.streams, self.max_tokens = load, key, streams, max_tokens
        self.requests: list[Stream] = []
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.streams)]

    async def stop(self) -> None:
        """Cut off every request in flight (the server sees the client go away)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _worker(self) -> None:
        while True:
            sample = await self.load.stream(self.key, self.max_tokens, self.requests)
            if sample.failed:
                await asyncio.sleep(sample.retry_after)

    def generating(self) -> int:
        """Requests that have received tokens so far."""
        return sum(1 for r in self.requests if r.chunks)

    def tokens_between(self, start: float, end: float) -> float:
        return sum(r.tokens_between(start, end) for r in self.requests)

    def summary(self, start: float, end: float) -> dict[str, Any]:
        """Throughput in ``[start, end)`` and the failures that ended in it, by status."""
        tokens = self.tokens_between(start, end)
        failures = Counter(
            str(r.status if r.status != 200 else "stream error")
            for r in self.requests
            if r.failed and start <= (r.ended or 0) < end
        )
        done = sum(1 for r in self.requests if r.ok and start <= (r.ended or 0) < end)
        return {
            "streams": self.streams,
            "window_s": round(end - start, 2),
            "tokens": round(tokens, 1),
            "tokens_per_s": round(tokens / (end - start), 3) if end > start else None,
            "completed": done,
            "failures": dict(failures),
        }


async def settle(floods: list[Flood], generating: int, timeout: float) -> None:
    """Wait until ``generating`` of the floods' requests have received tokens."""
    deadline = time.perf_counter() + timeout
    while sum(f.generating() for f in floods) < generating:
        if time.perf_counter() > deadline:
            raise TimeoutError(
                f"only {sum(f.generating() for f in floods)} of {generating} flood requests "
                f"got tokens in {timeout:.0f}s; failures: "
                f"{[r.error for f in floods for r in f.requests if r.failed][:3]}"
            )
        await asyncio.sleep(0.05)


def latency_summary(samples: list[Stream]) -> dict[str, Any]:
    """p50/p99 of end-to-end time and time to first token (seconds) of the ok requests."""
    ok = [s for s in samples if s.ok and s.ended is not None]
    e2e = [s.ended - s.started for s in ok]  # type: ignore[operator]
    ttft = [s.chunks[0] - s.started for s in ok if s.chunks]
    return {
        "requests": len(samples),
        "ok": len(ok),
        "failures": dict(Counter(str(s.status) for s in samples if not s.ok)),
        "p50_s": _percentile(e2e, 50),
        "p99_s": _percentile(e2e, 99),
        "max_s": round(max(e2e), 3) if e2e else None,
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p99_s": _percentile(ttft, 99),
    }


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None
