"""Turns a benchmark run into its report: throughput, latency percentiles, cache hit ratio.

The report is a JSON-ready dict whose keys are listed in ``REPORT_KEYS`` (tests check them).
Latencies are milliseconds; TTFT and end-to-end are per request, inter-token latency (ITL)
is every gap between streamed chunks of successful requests. The adapter cache hit ratio is
the change of ``loraplex_adapter_cache_hits_total`` / ``..._misses_total`` across the
measured part (null when the server does not export them). No I/O but the machine info.
"""

from __future__ import annotations

import os
import platform
import socket
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from loraplex.client.bench.runner import RunResult, Sample

SCHEMA = "loraplex-bench/1"
HITS = "loraplex_adapter_cache_hits_total"
MISSES = "loraplex_adapter_cache_misses_total"
REPORT_KEYS = (
    "schema",
    "url",
    "started_at",
    "machine",
    "config",
    "models",
    "requests",
    "throughput",
    "latency_ms",
    "tokens",
    "adapter_cache",
    "per_adapter",
    "per_tenant",
    "timeline",
)
PERCENTILES = (50, 90, 99)


def summarize(values: list[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99 and max of seconds, as milliseconds (None when empty)."""
    keys = ["mean", *(f"p{p}" for p in PERCENTILES), "max"]
    if not values:
        return dict.fromkeys(keys)
    ms = np.asarray(values, dtype=float) * 1000.0
    stats = [ms.mean(), *np.percentile(ms, PERCENTILES), ms.max()]
    return {k: round(float(v), 3) for k, v in zip(keys, stats, strict=True)}


def counter_total(metrics_text: str | None, name: str) -> float | None:
    """Sum of a counter's samples over all labels; None if absent or unparsable."""
    if not metrics_text:
        return None
    total, seen = 0.0, False
    try:
        for family in text_string_to_metric_families(metrics_text):
            for sample in family.samples:
                if sample.name == name:
                    total += sample.value
                    seen = True
    except ValueError:
        return None
    return total if seen else None


def cache_stats(before: str | None, after: str | None) -> dict[str, float | None]:
    """Hits, misses and hit ratio over the measured part (all None if not exported)."""
    values = {}
    for key, name in (("hits", HITS), ("misses", MISSES)):
        end, start = counter_total(after, name), counter_total(before, name)
        values[key] = None if end is None else end - (start or 0.0)
    hits, misses = values["hits"], values["misses"]
    ratio = None
    if hits is not None and misses is not None and hits + misses > 0:
        ratio = round(hits / (hits + misses), 4)
    return {"hits": hits, "misses": misses, "hit_ratio": ratio}


def machine_info() -> dict[str, Any]:
    """Where the benchmark ran (the client side)."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
    }


def _itls(samples: list[Sample]) -> list[float]:
    gaps: list[float] = []
    for s in samples:
        gaps.extend(float(g) for g in np.diff(s.chunk_times))
    return gaps


def _group(samples: list[Sample], key: str) -> dict[str, Any]:
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(getattr(s, key), []).append(s)
    out = {}
    for name, items in sorted(groups.items()):
        good = [s for s in items if s.ok]
        out[name] = {
            "requests": len(items),
            "ok": len(good),
            "ttft_ms": summarize([s.ttft for s in good if s.ttft is not None]),
            "e2e_ms": summarize([s.latency for s in good if s.latency is not None]),
        }
    return out


def _timeline(samples: list[Sample], wall: float) -> list[dict[str, float]]:
    """Completed requests and output tokens per one-second bucket."""
    buckets = max(1, int(np.ceil(wall)))
    done, tokens = np.zeros(buckets), np.zeros(buckets)
    for s in samples:
        if s.ok and s.latency is not None:
            i = min(buckets - 1, int(s.start + s.latency))
            done[i] += 1
            tokens[i] += s.output_tokens
    return [
        {"t": float(i), "requests": int(done[i]), "output_tokens": int(tokens[i])}
        for i in range(buckets)
    ]


def build_report(result: RunResult) -> dict[str, Any]:
    """The JSON-ready report of one run."""
    cfg, samples, wall = result.config, result.samples, max(result.wall_s, 1e-9)
    good = [s for s in samples if s.ok]
    errors = Counter(
        str(s.status) if s.status else (s.error or "?").split(":")[0] for s in samples if not s.ok
    )
    out_tokens = sum(s.output_tokens for s in good)
    in_tokens = sum(s.prompt_tokens for s in good)
    tpot = [
        (s.latency - s.ttft) / (s.output_tokens - 1)
        for s in good
        if s.ttft is not None and s.latency is not None and s.output_tokens > 1
    ]
    config = {k: (str(v) if k == "prompts" and v else v) for k, v in vars(cfg).items()}
    config.pop("api_keys", None)
    config["mode"] = cfg.mode
    return {
        "schema": SCHEMA,
        "url": cfg.url,
        "started_at": datetime.fromtimestamp(result.started_at, UTC).isoformat(),
        "machine": machine_info(),
        "config": config,
        "models": {"base": result.base_model, "adapters": result.adapters},
        "requests": {
            "total": len(samples),
            "ok": len(good),
            "failed": len(samples) - len(good),
            "success_rate": round(len(good) / len(samples), 4) if samples else None,
            "fell_back": sum(1 for s in good if s.fell_back),
            "errors": dict(errors),
            "first_errors": [s.error for s in samples if not s.ok][:5],
        },
        "throughput": {
            "duration_s": round(wall, 3),
            "requests_per_s": round(len(good) / wall, 4),
            "output_tokens_per_s": round(out_tokens / wall, 3),
            "total_tokens_per_s": round((out_tokens + in_tokens) / wall, 3),
        },
        "latency_ms": {
            "ttft": summarize([s.ttft for s in good if s.ttft is not None]),
            "itl": summarize(_itls(good)),
            "tpot": summarize(tpot),
            "e2e": summarize([s.latency for s in good if s.latency is not None]),
        },
        "tokens": {"prompt": in_tokens, "output": out_tokens},
        "adapter_cache": cache_stats(result.metrics_before, result.metrics_after),
        "per_adapter": _group(samples, "model"),
        "per_tenant": _group(samples, "tenant"),
        "timeline": _timeline(samples, wall),
    }


def format_summary(report: dict[str, Any]) -> str:
    """A few human lines for the terminal."""
    req, thr, lat = report["requests"], report["throughput"], report["latency_ms"]
    cache = report["adapter_cache"]["hit_ratio"]
    lines = [
        f"requests: {req['ok']}/{req['total']} ok ({req['success_rate']}), "
        f"fell back: {req['fell_back']}, errors: {req['errors'] or 'none'}",
        f"throughput: {thr['requests_per_s']} req/s, {thr['output_tokens_per_s']} output tok/s "
        f"over {thr['duration_s']} s",
    ]
    for name in ("ttft", "itl", "e2e"):
        s = lat[name]
        lines.append(f"{name:>5} ms: p50 {s['p50']}  p90 {s['p90']}  p99 {s['p99']}")
    lines.append(f"adapter cache hit ratio: {cache if cache is not None else 'n/a'}")
    return "\n".join(lines)
