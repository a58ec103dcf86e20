"""Tenants on a real server (auth on): keys, ownership, limits, caps, usage.

One server over a registry holding ``acme-bot`` (tenant acme), ``globex-bot`` (globex) and
``shared-bot`` (no tenant). A background tenant (``steady``) sends requests the whole time;
the last test asserts that it saw no error while the others were refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.config import Settings
from loraplex.registry.registry import Registry, open_registry
from loraplex.testing.bystander import Bystander
from loraplex.testing.launcher import RunningServer, loraplex_server, server_env
from loraplex.testing.scrape import metric_sum

pytestmark = pytest.mark.integration
BASE_NAME = "smollm2-135m"
ADMIN_KEY = "tenants-admin-key"
METRICS_KEY = "tenants-metrics-key"
CAPS = {"max_tokens_limit": 64, "max_n": 2, "max_prompts": 4, "max_request_bytes": 20_000}
ENGINE_SEQUENCES = 8  # one reserved (an eighth); the 7 others are shared by weight


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tenants-home")


@pytest.fixture(scope="module")
def registry(
    home: Path, base_model_dir: Path, make_random_adapter: Callable[..., Path]
) -> Iterator[Registry]:
    reg = open_registry(Settings(home=home, base_model=base_model_dir, max_lora_rank=16))
    for seed, (name, tenant) in enumerate(
        [("acme-bot", "acme"), ("globex-bot", "globex"), ("shared-bot", None)], start=21
    ):
        folder = make_random_adapter(home / "src" / name, seed=seed, rank=8)
        reg.push(folder, name, tenant=tenant)
    accounts = reg.accounts
    accounts.create_tenant("acme")
    accounts.create_tenant("globex")
    accounts.create_tenant("steady")
    accounts.create_tenant("metered")
    accounts.create_tenant("hasty", rpm=3)
    accounts.create_tenant("wordy", tpm=300)
    accounts.create_tenant("single", max_concurrency=1)
    accounts.create_tenant("flood")
    yield reg
    reg.close()


def new_key(registry: Registry, tenant: str) -> str:
    return registry.accounts.create_key(tenant)[1]


@pytest.fixture(scope="module")
def server(home: Path, base_model_dir: Path, registry: Registry) -> Iterator[RunningServer]:
    env = server_env(
        home,
        base_model_dir,
        auth="on",
        admin_key=ADMIN_KEY,
        metrics_key=METRICS_KEY,
        key_cache_seconds=0.5,
        usage_flush_seconds=0.5,
        served_model_name=BASE_NAME,
        max_engine_sequences=ENGINE_SEQUENCES,
        **CAPS,
    )
    for unset in ("LORAPLEX_ADAPTERS_DIR", "LORAPLEX_REGISTRY_URL", "LORAPLEX_BLOB_URL"):
        assert unset not in os.environ
    with loraplex_server(home / "server.log", env=env) as running:
        yield running


@pytest.fixture(scope="module")
def background(server: RunningServer, registry: Registry) -> Iterator[Bystander]:
    models = ("shared-bot", BASE_NAME)
    with Bystander(server.url, models, key=new_key(registry, "steady")) as load:
        yield load


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def completion(model: str, **extra: object) -> dict:
    return {"model": model, "prompt": "The sea is", "max_tokens": 4, "temperature": 0, **extra}


def post(server: RunningServer, key: str | None, body: dict, path: str = "/v1/completions"):
    headers = auth(key) if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120)


def test_keys_decide_the_tenant(server, registry, background, home) -> None:
    assert post(server, None, completion(BASE_NAME)).status_code == 401
    assert post(server, "lpx-00000000-not-a-real-key", completion(BASE_NAME)).status_code == 401
    result = subprocess.run(
        [sys.executable, "-m", "loraplex.cli", "keys", "create", "acme"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "LORAPLEX_HOME": str(home)},
    )
    key = next(w for w in result.stdout.split() if w.startswith("lpx-"))
    ok = post(server, key, completion("acme-bot"))
    assert ok.status_code == 200 and ok.headers["x-loraplex-adapter"] == "acme-bot@v1"


def test_a_revoked_key_stops_within_seconds(server, registry, background) -> None:
    record, key = registry.accounts.create_key("acme")
    assert post(server, key, completion(BASE_NAME)).status_code == 200
    registry.accounts.revoke_key(record.key_id)
    deadline = time.monotonic() + 10
    while post(server, key, completion(BASE_NAME)).status_code == 200:
        assert time.monotonic() < deadline, "a revoked key still works after 10 s"
        time.sleep(0.2)
    response = post(server, key, completion(BASE_NAME))
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_another_tenants_adapter_answers_like_an_unknown_one(server, registry, background):
    key = new_key(registry, "acme")
    theirs = post(server, key, completion("globex-bot"))
    unknown = post(server, key, completion("no-such-bot"))
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json()["error"] == {
        **unknown.json()["error"],
        "message": unknown.json()["error"]["message"].replace("no-such-bot", "globex-bot"),
    }
    assert post(server, key, completion("globex-bot@v1")).status_code == 404
    assert post(server, key, completion("shared-bot")).status_code == 200
    assert post(server, new_key(registry, "globex"), completion("globex-bot")).status_code == 200
    assert post(server, ADMIN_KEY, completion("globex-bot")).status_code == 200


def test_models_lists_what_the_caller_may_use(server, registry, background) -> None:
    def listed(key: str) -> set[str]:
        response = httpx.get(server.url + "/v1/models", headers=auth(key), timeout=30)
        return {m["id"] for m in response.json()["data"]}

    assert listed(new_key(registry, "acme")) == {BASE_NAME, "acme-bot", "shared-bot"}
    assert listed(new_key(registry, "globex")) == {BASE_NAME, "globex-bot", "shared-bot"}
    assert listed(ADMIN_KEY) == {BASE_NAME, "acme-bot", "globex-bot", "shared-bot"}
    assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401


def test_models_are_owned_by_their_tenant(server, registry, background) -> None:
    """``owned_by`` is the tenant (loraplex for shared ones); ``GET /v1/models/{id}`` of
    another tenant's adapter is the 404 of an unknown one, in every spelling of the name."""
    key = new_key(registry, "acme")

    def get(path: str) -> httpx.Response:
        return httpx.get(server.url + path, headers=auth(key), timeout=30)

    listed = {m["id"]: m for m in get("/v1/models").json()["data"]}
    assert listed["acme-bot"]["owned_by"] == "acme"
    assert listed["shared-bot"]["owned_by"] == "loraplex"
    assert get("/v1/models/acme-bot").json() == listed["acme-bot"]
    pinned = get("/v1/models/acme-bot@v1").json()
    assert pinned["owned_by"] == "acme" and pinned["created"] == listed["acme-bot"]["created"]
    unknown = get("/v1/models/no-such-bot")
    for theirs in ("globex-bot", "globex-bot@v1", "globex-bot:stable"):
        response = get(f"/v1/models/{theirs}")
        assert response.status_code == unknown.status_code == 404
        assert response.json()["error"] == {
            **unknown.json()["error"],
            "message": unknown.json()["error"]["message"].replace("no-such-bot", theirs),
        }


@pytest.mark.parametrize(
    ("path", "method"),
    [
        ("/admin/adapters", "GET"),
        ("/admin/usage", "GET"),
        ("/admin/adapters/acme-bot/load", "POST"),
    ],
)
def test_admin_routes_need_the_admin_key(server, registry, background, path, method) -> None:
    def call(key: str | None) -> int:
        headers = auth(key) if key else {}
        return httpx.request(method, server.url + path, headers=headers, timeout=60).status_code

    assert call(None) == 401
    assert call("wrong") == 401
    assert call(new_key(registry, "acme")) == 403
    assert call(METRICS_KEY) == 401
    assert call(ADMIN_KEY) == 200


def test_metrics_need_the_admin_or_metrics_key(server, registry, background) -> None:
    def call(key: str | None) -> httpx.Response:
        return httpx.get(server.url + "/metrics", headers=auth(key) if key else {}, timeout=30)

    assert call(None).status_code == 401
    assert call(new_key(registry, "acme")).status_code == 403
    assert "loraplex_requests" in call(METRICS_KEY).text
    assert call(ADMIN_KEY).status_code == 200


def test_requests_per_minute(server, registry, background) -> None:
    key = new_key(registry, "hasty")
    statuses = [post(server, key, completion(BASE_NAME)) for _ in range(4)]
    assert [r.status_code for r in statuses] == [200, 200, 200, 429]
    assert int(statuses[-1].headers["retry-after"]) >= 1
    assert statuses[-1].json()["error"]["code"] == "rate_limited"
    counted = metric_sum(server.url, "loraplex_requests_total", ADMIN_KEY, tenant="hasty")
    assert counted == 4
    assert (
        metric_sum(server.url, "loraplex_requests_total", ADMIN_KEY, tenant="hasty", status="429")
        == 1
    )


def test_tokens_per_minute(server, registry, background) -> None:
    key = new_key(registry, "wordy")
    # 8 requests of ~64 tokens at once against 300 a minute: reserved at admission, before any
    # engine work, so the bucket (refilling 5 tokens/s) runs dry whatever the machine's speed.
    body = completion(BASE_NAME, max_tokens=60, ignore_eos=True)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: post(server, key, body), range(8)))
    statuses = [response.status_code for response in responses]
    assert 200 in statuses and 429 in statuses, statuses
    refused = next(response for response in responses if response.status_code == 429)
    assert "tokens per minute" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1


def test_concurrent_requests(server, registry, background) -> None:
    key = new_key(registry, "single")
    body = completion(BASE_NAME, max_tokens=48, ignore_eos=True)
    with (
        httpx.Client(timeout=120) as client,
        client.stream(
            "POST", server.url + "/v1/completions", json={**body, "stream": True}, headers=auth(key)
        ) as first,
    ):
        assert first.status_code == 200
        second = post(server, key, completion(BASE_NAME))
        assert second.status_code == 429 and "in progress" in second.json()["error"]["message"]
        first.read()
    assert post(server, key, completion(BASE_NAME)).status_code == 200


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ({"max_tokens": 65}, 400),
        ({"n": 3, "temperature": 0.7}, 400),
        ({"n": 2}, 400),  # greedy decoding has one answer
        ({"prompt": ["a", "b", "c", "d", "e"]}, 400),
        ({"prompt": "word " * 5000}, 413),
    ],
)
def test_server_caps(server, registry, background, extra, status) -> None:
    response = post(server, new_key(registry, "acme"), completion(BASE_NAME, **extra))
    assert response.status_code == status, response.text


def test_a_chunked_body_over_the_cap_is_413(server, registry, background) -> None:
    payload = json.dumps(completion(BASE_NAME, prompt="word " * 5000)).encode()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(payload), 4096):
            yield payload[start : start + 4096]

    response = httpx.post(
        server.url + "/v1/completions",
        content=chunks(),
        headers={**auth(new_key(registry, "acme")), "content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413


def test_usage_matches_the_responses(server, registry, background) -> None:
    key = new_key(registry, "metered")
    prompt = completion_tokens = 0
    for body in (
        completion(BASE_NAME),
        completion("shared-bot", max_tokens=6),
        completion(BASE_NAME, prompt=["One", "Two two"], n=2, temperature=0.7, seed=1),
    ):
        response = post(server, key, body)
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        prompt += usage["prompt_tokens"]
        completion_tokens += usage["completion_tokens"]
    stream_body = completion(BASE_NAME, stream=True, stream_options={"include_usage": True})
    text = post(server, key, stream_body).text
    events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data:")]
    assert events[-1] == "[DONE]", text
    usage = json.loads(events[-2])["usage"]
    prompt += usage["prompt_tokens"]
    completion_tokens += usage["completion_tokens"]

    rows = httpx.get(server.url + "/admin/usage", headers=auth(ADMIN_KEY), timeout=30).json()
    mine = [row for row in rows["usage"] if row["tenant"] == "metered"]
    assert {row["adapter"] for row in mine} == {BASE_NAME, "shared-bot@v1"}
    assert sum(row["requests"] for row in mine) == 4
    assert sum(row["prompt_tokens"] for row in mine) == prompt
    assert sum(row["completion_tokens"] for row in mine) == completion_tokens
    stored = registry.accounts.usage()
    assert sum(r.prompt_tokens for r in stored if r.tenant == "metered") == prompt


def test_prefix_cache_is_kept_apart_per_tenant(server, registry, background) -> None:
    body = completion(BASE_NAME, prompt=" ".join(f"item{i}" for i in range(300)), max_tokens=2)

    def cached(key: str) -> int:
        response = post(server, key, body)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    acme, globex = new_key(registry, "acme"), new_key(registry, "globex")
    assert cached(acme) == 0
    assert cached(acme) > 0  # the same tenant reuses its cached prefix
    assert cached(globex) == 0  # another tenant does not, so timing reveals nothing


def seats(server: RunningServer) -> tuple[dict[str, float], dict[str, float]]:
    """Engine sequences held and requests queued, by tenant, from ``/metrics``."""
    response = httpx.get(server.url + "/metrics", headers=auth(METRICS_KEY), timeout=30)
    response.raise_for_status()
    held: dict[str, float] = {}
    queued: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "loraplex_tenant_engine_sequences":
                held[sample.labels["tenant"]] = sample.value
            elif sample.name == "loraplex_tenant_queued_requests":
                queued[sample.labels["tenant"]] = sample.value
    return held, queued


def test_a_flood_borrows_unused_shares_and_a_quiet_tenant_goes_first(
    server, registry, background
) -> None:
    """With lending (the default), the flood borrows the other tenants' unused shares (more
    than half of the 7 shared seats although steady, the bystander, is active), yet quiet
    requests are let in ahead of the flood's queued requests, as lenders; none is aborted.

    The flood's requests are all the same length, so its seats free in waves; 28 of them fill
    several waves, so that after the quiet requests have ended, the flood still has requests
    queued however slow the machine (with 20 on an idle machine: quiet requests took ~0.3 s,
    the flood kept a queue for ~8 s of its ~11 s)."""
    flood, quiet = new_key(registry, "flood"), new_key(registry, "globex")
    body = completion(BASE_NAME, max_tokens=48, ignore_eos=True)
    shared = ENGINE_SEQUENCES - ENGINE_SEQUENCES // 8
    samples: list[tuple[dict[str, float], dict[str, float]]] = []
    with ThreadPoolExecutor(32) as pool:
        flooding = [pool.submit(post, server, flood, body) for _ in range(28)]
        deadline = time.monotonic() + 300
        while not seats(server)[1].get("flood"):
            assert time.monotonic() < deadline, "the flood never queued"
            time.sleep(0.1)
        samples.append(seats(server))
        sent = time.monotonic()
        answers = [pool.submit(post, server, quiet, completion(BASE_NAME)) for _ in range(2)]
        answers = [a.result() for a in answers]
        quiet_seconds = time.monotonic() - sent
        after = seats(server)
        while not all(f.done() for f in flooding):
            samples.append(seats(server))
            time.sleep(0.2)
        statuses = [f.result().status_code for f in flooding]
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    # the quiet requests went ahead of the flood's queue
    assert after[1].get("flood", 0) >= 1, (quiet_seconds, samples[0], after, served(server))
    assert statuses == [200] * 28
    assert shared // 2 < max(held.get("flood", 0) for held, _ in [after, *samples]) <= shared


def served(server: RunningServer) -> list[tuple[str, float, float]]:
    """(tenant, queue wait, total seconds) of the last 40 completions in the server's log."""
    lines = server.log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith('{"event": "request"')]
    return [
        (r["tenant"], r["queue_wait_s"], r["total_s"])
        for r in records
        if r["path"] == "/v1/completions" and r["queue_wait_s"] is not None
    ][-40:]


def test_the_background_tenant_saw_no_errors(background) -> None:
    background.wait_sent(6)
    background.assert_clean(min_sent=6)
