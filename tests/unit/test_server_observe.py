"""Metrics, request ids and JSON request log lines of the app over the fake engine."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from route_checks import BASE, assert_error, chat

from loraplex.server.live_stats import LiveStats
from loraplex.server.metrics import OTHER, HitWindow, LabelCap

if TYPE_CHECKING:
    from fake_engine import FakeEngine
    from route_checks import Serve

pytestmark = pytest.mark.anyio


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) -> value of a /metrics exposition."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, metric: str, **labels: str) -> float:
    """Sum of the samples of ``metric`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples(text).items() if n == metric and wanted <= ls)


@pytest.fixture
def log_lines(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """``caplog`` with the ``loraplex.requests`` logger's records (it does not propagate)."""
    logger = logging.getLogger("loraplex.requests")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_label_cap_counts_overflow_as_other() -> None:
    cap = LabelCap(2)
    assert [cap(v) for v in ("a", "b", "c", "a", "d")] == ["a", "b", OTHER, "a", OTHER]


def test_hit_window_forgets_old_lookups() -> None:
    now = [0.0]
    window = HitWindow(60, clock=lambda: now[0])
    assert window.ratio() == 1.0
    window.record(False)
    now[0] = 30
    window.record(True)
    assert window.ratio() == 0.5
    now[0] = 61
    assert window.ratio() == 1.0  # the miss has left the window


async def test_metrics_after_known_traffic(serve: Serve, engine: FakeEngine) -> None:
    async with serve(metrics_max_adapters=2) as client:
        for model in ("sales", "sales", BASE, "support"):
            response = await client.post("/v1/chat/completions", json=chat(model))
            assert response.status_code == 200, response.text
        missing = await client.post("/v1/chat/completions", json=chat("nope"))
        assert_error(missing, 404, "model_not_found")
        engine.engine_stats.evictions = 3
        engine.engine_stats.kv_cache_usage = 0.25
        engine.engine_stats.hot_merged = "sales@v1"
        engine.engine_stats.hot_merges, engine.engine_stats.hot_unmerges = 2, 1
        text = (await client.get("/metrics")).text
    sales = engine.loads[0]
    ok = {"route": "/v1/chat/completions", "status": "200", "tenant": "anonymous"}
    assert value(text, "loraplex_requests_total", adapter=sales, **ok) == 2
    assert value(text, "loraplex_requests_total", adapter=BASE, **ok) == 1
    # sales, the base model, then support: the third adapter label is over the cap of 2.
    assert value(text, "loraplex_requests_total", adapter=OTHER, **ok) == 1
    assert value(text, "loraplex_requests_total", status="404") == 1
    assert value(text, "loraplex_adapter_cache_hits_total") == 1
    assert value(text, "loraplex_adapter_cache_misses_total") == 2
    assert value(text, "loraplex_adapter_cache_hit_ratio") == pytest.approx(1 / 3)
    assert value(text, "loraplex_adapter_loads_total", tier="engine") == 1
    assert value(text, "loraplex_adapter_loads_total", tier="disk") == 2
    assert value(text, "loraplex_adapter_load_seconds_count", tier="disk") == 2
    assert value(text, "loraplex_completion_tokens_total", tenant="anonymous", adapter=sales) == 6
    assert value(text, "loraplex_prompt_tokens_total", adapter=sales) > 0
    assert value(text, "loraplex_time_to_first_token_seconds_count", adapter=sales) == 2
    assert value(text, "loraplex_inter_token_latency_seconds_count", adapter=sales) == 4
    assert value(text, "loraplex_queue_wait_seconds_count", adapter=sales) == 2
    assert value(text, "loraplex_adapters_resident", tier="cpu") == 2
    assert value(text, "loraplex_adapter_cache_evictions_total") == 3
    assert value(text, "loraplex_engine_kv_cache_usage_ratio") == 0.25
    assert value(text, "loraplex_hot_merged", version="sales@v1") == 1
    assert value(text, "loraplex_hot_merges_total") == 2
    assert value(text, "loraplex_hot_unmerges_total") == 1
    assert value(text, "loraplex_live") == 1
    assert value(text, "loraplex_base_model_info", name=BASE) == 1
    assert "loraplex_build_info{" in text


async def test_request_id_is_kept_when_well_formed(serve: Serve) -> None:
    async with serve() as client:

        async def request_id(sent: str | None, model: str = BASE) -> str:
            headers = {"x-request-id": sent} if sent is not None else {}
            response = await client.post("/v1/chat/completions", json=chat(model), headers=headers)
            return response.headers["x-request-id"]

        assert await request_id("trace-42.a:b") == "trace-42.a:b"
        assert (await request_id("bad id\twith spaces")).startswith("chatcmpl-")
        assert (await request_id("x" * 200)).startswith("chatcmpl-")
        assert (await request_id(None, "nope")).startswith("req-")
        assert await request_id("mine", "nope") == "mine"


async def test_one_json_line_per_request(serve: Serve, log_lines: pytest.LogCaptureFixture) -> None:
    async with serve(auth="on", admin_key="admin-secret") as client:
        headers = {"authorization": "Bearer admin-secret", "x-request-id": "r-1"}
        body = chat("sales", messages=[{"role": "user", "content": "secret prompt"}])
        assert (await client.post("/v1/chat/completions", json=body, headers=headers)).is_success
        headers["x-request-id"] = "r-2"
        await client.post("/v1/chat/completions", json=chat("nope"), headers=headers)
        await client.get("/metrics", headers=headers)
    lines = [json.loads(r.getMessage()) for r in log_lines.records]
    assert [line["request_id"] for line in lines] == ["r-1", "r-2"]
    ok, missing = lines
    assert ok["status"] == 200 and ok["tenant"] == "admin" and ok["adapter"].startswith("sales@")
    assert ok["completion_tokens"] == 3 and ok["prompt_tokens"] > 0 and not ok["fallback"]
    assert ok["ttft_s"] <= ok["total_s"] and ok["queue_wait_s"] is not None
    assert ok["load_tier"] == "disk"
    assert missing["status"] == 404 and missing["error"].startswith("model_not_found")
    raw = "\n".join(r.getMessage() for r in log_lines.records)
    assert "admin-secret" not in raw and "secret prompt" not in raw


async def test_prompts_are_logged_only_when_enabled(
    serve: Serve, log_lines: pytest.LogCaptureFixture
) -> None:
    async with serve(log_prompts=True) as client:
        body = chat(BASE, messages=[{"role": "user", "content": "tell me"}])
        assert (await client.post("/v1/chat/completions", json=body)).is_success
    assert "tell me" in json.loads(log_lines.records[-1].getMessage())["prompt"]


async def test_unrouted_paths_are_not_counted(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/nothing-here")).status_code == 404
    text = (await client.get("/metrics")).text
    assert value(text, "loraplex_requests_total") == 0


def test_live_stats_rate_and_quantiles() -> None:
    now = [0.0]
    live = LiveStats(horizon=60, clock=lambda: now[0])
    for seconds in (0.1, 0.2, 0.3, 0.4):
        live.record("a@v1", seconds, ok=True)
    live.record("a@v1", 9.0, ok=False)
    now[0] = 5
    assert live.snapshot(10)["a@v1"] == {"rate": 0.5, "error_rate": 0.1, "p50": 0.3, "p99": 9.0}
    now[0] = 100
    assert live.snapshot(10)["a@v1"] == {"rate": 0, "error_rate": 0, "p50": None, "p99": None}


async def test_console_page_and_its_data_need_the_admin_key(serve: Serve) -> None:
    admin = {"authorization": "Bearer admin-secret"}
    async with serve(auth="on", admin_key="admin-secret") as client:
        page = await client.get("/ui")
        assert page.status_code == 200 and "/ui/console.js" in page.text
        assert (await client.get("/ui/console.js")).status_code == 200
        assert (await client.get("/ui/secrets.txt")).status_code == 404
        assert_error(await client.get("/admin/console"), 401, "invalid_api_key")
        for _ in range(2):
            await client.post("/v1/chat/completions", json=chat("sales"), headers=admin)
        await client.post("/v1/chat/completions", json=chat("nope"), headers=admin)
        data = (await client.get("/admin/console", headers=admin)).json()
    adapters = {a["name"]: a for a in data["adapters"]}
    assert set(adapters) == {"sales", "support"}
    (sales,) = adapters["sales"]["versions"]
    assert adapters["sales"]["residency"] == {sales: "cpu"}
    assert data["live"][sales]["rate"] == 2 / data["window_seconds"]
    assert [e["status"] for e in data["errors"]] == [404]
