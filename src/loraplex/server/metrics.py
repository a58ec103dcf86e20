"""Prometheus metrics of the server, in their own registry (one per app instance).

Names are part of the contract used by dashboards, alerts and ``loraplex bench``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """All loraplex metrics for one server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loraplex_requests",
            "Requests by route, adapter and HTTP status.",
            ["route", "adapter", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "loraplex_prompt_tokens", "Prompt tokens processed.", ["adapter"], registry=r
        )
        self.completion_tokens = Counter(
            "loraplex_completion_tokens", "Completion tokens generated.", ["adapter"], registry=r
        )
        self.ttft = Histogram(
            "loraplex_time_to_first_token_seconds",
            "Time to first token.",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "loraplex_request_duration_seconds",
            "End-to-end request time.",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter(
            "loraplex_adapter_cache_hits",
            "Requests whose adapter was already loaded.",
            registry=r,
        )
        self.cache_misses = Counter(
            "loraplex_adapter_cache_misses",
            "Requests that had to load their adapter.",
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "loraplex_adapter_load_seconds",
            "Time to load an adapter into the engine.",
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
