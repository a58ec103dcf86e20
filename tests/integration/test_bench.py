"""``loraplex bench`` end to end against the real server: a short closed-loop run over
adapters discovered from /v1/models, then an open-loop run on the base model; the JSON
report has every field, the cache hit ratio comes from /metrics, and plots are written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraplex.cli import app
from loraplex.client.bench.report import REPORT_KEYS

pytestmark = pytest.mark.integration


def _bench(tmp_path: Path, name: str, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    result = CliRunner().invoke(
        app, ["bench", *args, "--max-tokens", "8", "--no-progress", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def _check(report: dict, total: int) -> None:
    assert set(REPORT_KEYS) <= set(report)
    req = report["requests"]
    assert req["total"] == total and req["success_rate"] == 1.0, req
    for name in ("ttft", "itl", "tpot", "e2e"):
        stats = report["latency_ms"][name]
        assert set(stats) == {"mean", "p50", "p90", "p99", "max"}
        assert stats["p50"] is not None and stats["p50"] > 0
    assert report["throughput"]["output_tokens_per_s"] > 0
    assert report["tokens"]["output"] > 0 and report["tokens"]["prompt"] > 0
    assert report["machine"]["cpu_count"] and report["started_at"]


def test_bench_closed_loop_over_adapters(server, tmp_path: Path) -> None:
    args = "--concurrency 4 --requests 8 --adapters 3 --zipf 1.0 --tenants 2 --endpoint chat"
    report = _bench(tmp_path, "closed", "--url", server.url, *args.split(), "--plot")
    _check(report, 8)
    assert report["models"]["base"] == server.base and len(report["models"]["adapters"]) == 3
    assert set(report["per_adapter"]) <= set(report["models"]["adapters"])
    cache = report["adapter_cache"]
    assert cache["hits"] + cache["misses"] == 8 and 0 <= cache["hit_ratio"] <= 1
    assert (tmp_path / "closed_latency_cdf.png").stat().st_size > 1000
    assert (tmp_path / "closed_throughput.png").stat().st_size > 1000


def test_bench_open_loop_on_base_model(server, tmp_path: Path) -> None:
    args = "--rate 20 --requests 6 --adapters 0 --endpoint chat"
    report = _bench(tmp_path, "open", "--url", server.url, *args.split())
    _check(report, 6)
    assert set(report["per_adapter"]) == {server.base}
    assert report["adapter_cache"]["hit_ratio"] is None
    assert report["config"]["mode"] == "open"


def test_bench_refuses_more_adapters_than_served(server, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--url",
            server.url,
            "--adapters",
            "500",
            "--requests",
            "1",
            "--out",
            str(tmp_path / "x.json"),
        ],
    )
    assert result.exit_code != 0 and "Asked for 500 adapters" in str(result.exception)
