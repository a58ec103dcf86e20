"""The load generator: workload logic, report figures, and whole runs against the stub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from typer.testing import CliRunner

from loraplex.cli import app
from loraplex.client.bench.report import (
    REPORT_KEYS,
    build_report,
    cache_stats,
    counter_total,
    summarize,
)
from loraplex.client.bench.runner import BenchConfig, run_bench
from loraplex.client.bench.workload import Workload, load_prompts, poisson_gaps, zipf_weights
from loraplex.errors import InvalidRequest

if TYPE_CHECKING:
    from stub_server import StubServer


def test_zipf_weights() -> None:
    w = zipf_weights(4, 1.0)
    assert np.isclose(w.sum(), 1.0) and np.all(np.diff(w) < 0)
    assert np.isclose(w[0] / w[1], 2.0)
    assert np.allclose(zipf_weights(3, 0.0), 1 / 3)
    with pytest.raises(InvalidRequest):
        zipf_weights(0, 1.0)
    with pytest.raises(InvalidRequest):
        zipf_weights(3, -1.0)


def test_workload_is_seeded_skewed_and_assigns_tenants() -> None:
    def draw(seed: int) -> list:
        w = Workload(
            adapters=["a", "b", "c"],
            base_model=None,
            zipf_s=1.2,
            tenants=2,
            prompts=["p1", "p2"],
            seed=seed,
        )
        return [w.next(i) for i in range(300)]

    first = draw(7)
    assert first == draw(7)
    counts = {m: sum(r.model == m for r in first) for m in "abc"}
    assert counts["a"] > counts["b"] > counts["c"] > 0
    assert {(r.model, r.tenant) for r in first} == {
        ("a", "tenant-0"),
        ("b", "tenant-1"),
        ("c", "tenant-0"),
    }
    base_only = Workload(adapters=[], base_model="base", zipf_s=1, tenants=3, prompts=["p"])
    assert {base_only.next(i).model for i in range(20)} == {"base"}
    with pytest.raises(InvalidRequest):
        Workload(adapters=[], base_model=None, zipf_s=1, tenants=1, prompts=["p"])
    with pytest.raises(InvalidRequest):
        Workload(adapters=["a"], base_model=None, zipf_s=1, tenants=0, prompts=["p"])


def test_poisson_gaps_mean() -> None:
    gaps = poisson_gaps(10.0)
    mean = np.mean([next(gaps) for _ in range(5000)])
    assert 0.08 < mean < 0.12
    with pytest.raises(InvalidRequest):
        next(poisson_gaps(0))


def test_load_prompts(tmp_path: Path) -> None:
    text = tmp_path / "p.txt"
    text.write_text("one\n\ntwo\n")
    assert load_prompts(text, "completion") == ["one", "two"]
    assert load_prompts(text, "chat")[0] == [{"role": "user", "content": "one"}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a"}\n{"messages": [{"role": "user", "content": "b"}]}\n')
    assert load_prompts(jsonl, "completion") == ["a", "b"]
    assert len(load_prompts(None, "completion")) > 8
    for content in ("{bad json", '{"text": "no prompt key"}'):
        jsonl.write_text(content)
        with pytest.raises(InvalidRequest):
            load_prompts(jsonl, "completion")
    with pytest.raises(InvalidRequest):
        load_prompts(tmp_path / "absent.txt", "completion")
    text.write_text("\n\n")
    with pytest.raises(InvalidRequest):
        load_prompts(text, "completion")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"concurrency": 2, "rate": 1.0},
        {"concurrency": 0},
        {"requests": 0},
        {"duration": -1.0},
        {"max_tokens": 0},
        {"tenants": 3, "api_keys": ["k1", "k2"]},
    ],
)
def test_bench_config_refuses_bad_settings(kwargs: dict) -> None:
    with pytest.raises(InvalidRequest):
        BenchConfig(url="http://x", **kwargs).validate()


def test_metrics_parsing() -> None:
    text = (
        "# TYPE loraplex_adapter_cache_hits_total counter\n"
        'loraplex_adapter_cache_hits_total{tier="gpu"} 3\n'
        'loraplex_adapter_cache_hits_total{tier="cpu"} 2\n'
    )
    assert counter_total(text, "loraplex_adapter_cache_hits_total") == 5
    assert counter_total(text, "loraplex_adapter_cache_misses_total") is None
    assert counter_total(None, "x") is None
    assert cache_stats(None, None) == {"hits": None, "misses": None, "hit_ratio": None}
    assert cache_stats(text, text)["hit_ratio"] is None
    assert summarize([]) == dict.fromkeys(["mean", "p50", "p90", "p99", "max"])
    assert summarize([0.001, 0.003])["p50"] == 2.0


def _check_report(report: dict, total: int) -> None:
    assert set(REPORT_KEYS) <= set(report)
    assert report["requests"]["total"] == total
    for name in ("ttft", "itl", "tpot", "e2e"):
        assert set(report["latency_ms"][name]) == {"mean", "p50", "p90", "p99", "max"}
    assert set(report["throughput"]) >= {"requests_per_s", "output_tokens_per_s"}
    assert set(report["adapter_cache"]) == {"hits", "misses", "hit_ratio"}
    json.dumps(report)


def test_closed_loop_run_against_stub(stub: StubServer) -> None:
    cfg = BenchConfig(
        url=stub.url,
        concurrency=4,
        requests=24,
        adapters=3,
        zipf=1.0,
        tenants=2,
        max_tokens=3,
        progress=False,
        warmup=2,
    )
    result = run_bench(cfg)
    report = build_report(result)
    _check_report(report, 24)
    assert report["requests"]["success_rate"] == 1.0
    assert report["tokens"]["output"] == 24 * 3
    assert report["latency_ms"]["ttft"]["p50"] > 0 and report["latency_ms"]["itl"]["p99"] > 0
    assert report["adapter_cache"]["hits"] == 24 and report["adapter_cache"]["misses"] == 0
    assert set(report["per_adapter"]) <= {"a1", "a2", "a3"}
    assert set(report["per_tenant"]) == {"tenant-0", "tenant-1"}
    assert report["models"] == {"base": stub.base, "adapters": ["a1", "a2", "a3"]}


def test_open_loop_counts_failures_without_retrying(stub: StubServer) -> None:
    cfg = BenchConfig(
        url=stub.url,
        rate=50.0,
        requests=10,
        adapter_names=["down"],
        max_tokens=2,
        progress=False,
        endpoint="chat",
    )
    report = build_report(run_bench(cfg))
    assert stub.app.state.calls["down"] == 10
    _check_report(report, 10)
    assert report["requests"]["success_rate"] == 0.0
    assert report["requests"]["errors"] == {"503": 10}
    assert report["latency_ms"]["ttft"]["p50"] is None


def test_tenant_keys_own_the_adapters_their_listing_shows(stub: StubServer) -> None:
    cfg = BenchConfig(
        url=stub.url,
        concurrency=2,
        requests=30,
        api_keys=["key0", "key1"],
        zipf=0.0,
        max_tokens=2,
        progress=False,
    )
    report = build_report(run_bench(cfg))
    sent = set(stub.app.state.keys)
    assert report["config"]["tenants"] == 2 and "api_keys" not in report["config"]
    assert report["models"]["adapters"] == ["a1", "a3", "a2"]
    assert sent == {("a1", "Bearer key0"), ("a2", "Bearer key0"), ("a3", "Bearer key1")}
    assert report["per_tenant"]["tenant-1"]["requests"] == report["per_adapter"]["a3"]["requests"]


def test_too_many_adapters_is_refused(stub: StubServer) -> None:
    with pytest.raises(InvalidRequest, match="only 5"):
        run_bench(BenchConfig(url=stub.url, adapters=50, requests=1, progress=False))


def test_cli_writes_json_and_plots(tmp_path: Path, stub: StubServer) -> None:
    out = tmp_path / "r" / "run.json"
    res = CliRunner().invoke(
        app,
        [
            "bench",
            "--url",
            stub.url,
            "--concurrency",
            "2",
            "--requests",
            "6",
            "--adapters",
            "0",
            "--max-tokens",
            "2",
            "--out",
            str(out),
            "--plot",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    _check_report(report, 6)
    assert set(report["per_adapter"]) == {stub.base}
    assert (tmp_path / "r" / "run_latency_cdf.png").stat().st_size > 1000
    assert (tmp_path / "r" / "run_throughput.png").stat().st_size > 1000
