"""/metrics, alerts, dashboard and request log lines of a real server (session ``server``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loraplex.testing.launcher import RunningServer
from loraplex.testing.scrape import metric_sum

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC_NAME = re.compile(r"\bloraplex_[a-z_]+\b")


def used_names() -> set[str]:
    """Every loraplex_ metric name in the alert rules and the Grafana dashboard."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads((DEPLOY / "grafana" / "loraplex.json").read_text())
    exprs += [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


def test_rules_and_dashboard_use_only_served_metrics(server: RunningServer) -> None:
    for model in ("pirate", "pirate", server.base):  # type: ignore[attr-defined]
        body = {"model": model, "prompt": "Hi", "max_tokens": 3, "temperature": 0}
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=120).is_success
    text = httpx.get(server.url + "/metrics", timeout=10).text
    families = list(text_string_to_metric_families(text))
    # A labelled metric nothing has touched yet (no fallback here) is declared, without samples.
    declared = {f.name + suffix for f in families for suffix in ("", "_total") if not f.samples}
    served = declared | {s.name for f in families for s in f.samples}
    names = used_names()
    assert len(names) > 15
    assert names - served == set()


def test_the_process_and_its_garbage_collector_are_measured(server: RunningServer) -> None:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    samples = {
        (s.name, s.labels.get("generation")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("process_resident_memory_bytes", None)] > 50e6  # torch and vLLM alone
    assert samples[("process_cpu_seconds_total", None)] > 0
    generations = {gen for name, gen in samples if name == "python_gc_collections_total"}
    assert generations == {"0", "1", "2"}


def test_counts_a_miss_then_a_hit(server: RunningServer) -> None:
    admin = {"authorization": f"Bearer {server.admin_key}"}  # type: ignore[attr-defined]
    httpx.post(server.url + "/admin/adapters/random2/unload", headers=admin, timeout=120)
    before = {
        name: metric_sum(server.url, name)
        for name in ("loraplex_adapter_cache_misses_total", "loraplex_adapter_cache_hits_total")
    }
    sent = metric_sum(server.url, "loraplex_requests_total", status="200")
    body = {"model": "random2", "prompt": "Hi", "max_tokens": 2, "temperature": 0}
    for _ in range(2):
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=120).is_success
    assert metric_sum(server.url, "loraplex_adapter_cache_misses_total") == (
        before["loraplex_adapter_cache_misses_total"] + 1
    )
    assert metric_sum(server.url, "loraplex_adapter_cache_hits_total") >= (
        before["loraplex_adapter_cache_hits_total"] + 1
    )
    assert metric_sum(server.url, "loraplex_requests_total", status="200") >= sent + 2


def test_one_json_log_line_per_request(server: RunningServer) -> None:
    body = {"model": "shout", "prompt": "private words", "max_tokens": 3, "temperature": 0}
    headers = {"x-request-id": "obs-test-1"}
    response = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=120)
    assert response.headers["x-request-id"] == "obs-test-1"
    lines = [
        json.loads(line)
        for line in server.log_path.read_text().splitlines()
        if line.startswith('{"event": "request"')
    ]
    (line,) = [entry for entry in lines if entry["request_id"] == "obs-test-1"]
    assert line["status"] == 200 and line["adapter"] == response.headers["x-loraplex-adapter"]
    assert line["completion_tokens"] == 3 and line["prompt_tokens"] > 0
    assert 0 <= line["queue_wait_s"] <= line["ttft_s"] <= line["total_s"]
    assert line["fallback"] is False and "prompt" not in line
    assert "private words" not in server.log_path.read_text()
