"""Read one metric from a live server's ``/metrics`` (tests and benchmarks)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def metric_sum(url: str, name: str, key: str | None = None, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when there are none)."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(url + "/metrics", headers=headers, timeout=30)
    response.raise_for_status()
    return sum(
        sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )
