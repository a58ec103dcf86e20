"""``loraplex serve --ray`` on a real local Ray cluster: two replicas of the bundled model,
sharing one registry in PostgreSQL (``LORAPLEX_TEST_POSTGRES_URL``; the module skips locally
without it and fails under ``CI=true``) and a ``moto_server`` S3 blob store, as on a cluster.

Requests for four adapters end with each adapter loaded on fewer replicas than random routing
would give (read from each replica's own ``/metrics``, found through ``/ray/targets``), base
model requests reach both replicas, streaming is relayed chunk by chunk, an unknown adapter is
a 404, a promote is served at once through the router after every replica warmed the new
version, a tenant's requests/min hold across both replicas, and when one replica's process is
killed while requests run, those in progress on it end with a clean 503, every request sent
after the kill is served, and Ray starts a replacement that serves.
One Ray cluster (a subprocess) for the module.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import httpx
import psutil
import pytest

from loraplex.config import Settings
from loraplex.registry.registry import Registry, open_registry
from loraplex.testing.launcher import RunningServer, running_server, server_env
from loraplex.testing.postgres import fresh_database
from loraplex.testing.scrape import metric_sum

pytestmark = pytest.mark.integration
BASE_NAME = "smollm2-135m"
ADAPTERS = ("a0", "a1", "a2", "a3")
REPLICA_HEADER = "x-loraplex-replica"
ADMIN_KEY = "ray-admin-key"
CAPPED_RPM = 2
KEYS: dict[str, str] = {}  # tenant -> API key, made with the registry


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ray-home")


@pytest.fixture(scope="module")
def store(s3_endpoint: str) -> Iterator[dict[str, str]]:
    """The shared registry's settings: a fresh PostgreSQL database and S3 bucket."""
    bucket = f"loraplex-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    with fresh_database() as database:
        yield {
            "registry_url": database,
            "blob_url": f"s3://{bucket}/adapters",
            "s3_endpoint_url": s3_endpoint,
        }


@pytest.fixture(scope="module")
def registry(
    home: Path,
    base_model_dir: Path,
    make_random_adapter: Callable[..., Path],
    store: dict[str, str],
) -> Iterator[Registry]:
    """``a0``..``a3`` and ``promo`` v1 (stable) and v2, tenants ``free`` (no limits) and
    ``capped`` (``CAPPED_RPM`` requests/min) with keys, in the registry both replicas share."""
    reg = open_registry(
        Settings(home=home / "pusher", base_model=base_model_dir, max_lora_rank=16, **store)
    )
    for seed, name in enumerate((*ADAPTERS, "promo", "promo"), start=40):
        reg.push(make_random_adapter(home / "src" / str(seed), seed=seed), name)
    reg.promote("promo@v1")
    reg.accounts.create_tenant("free")
    reg.accounts.create_tenant("capped", rpm=CAPPED_RPM)
    KEYS.update({t: reg.accounts.create_key(t)[1] for t in ("free", "capped")})
    yield reg
    reg.close()


@pytest.fixture(scope="module")
def ray_server(
    home: Path, base_model_dir: Path, registry: Registry, store: dict[str, str]
) -> Iterator[RunningServer]:
    env = server_env(
        home,
        base_model_dir,
        **store,
        served_model_name=BASE_NAME,
        max_model_len=512,
        auth="on",
        admin_key=ADMIN_KEY,
    )
    env["OMP_NUM_THREADS"] = "1"  # two engines on the machine's cores
    # Ray kills workers once the node passes 95% memory, counting every process on the machine
    # (other test servers too): leave out-of-memory to the kernel in tests.
    env["RAY_memory_monitor_refresh_ms"] = "0"
    command = [sys.executable, "-m", "loraplex.cli", "serve", "--ray", "--replicas", "2"]
    command += ["--host", "127.0.0.1", "--port", "0", "--adapters-per-replica", "4"]
    with running_server(command, home / "ray.log", env=env, timeout=900) as running:
        yield running


def auth(tenant: str = "free") -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


def post(server: RunningServer, model: str, tenant: str = "free") -> httpx.Response:
    body = {"model": model, "prompt": "The weather today is", "max_tokens": 2, "temperature": 0}
    return httpx.post(server.url + "/v1/completions", json=body, headers=auth(tenant), timeout=300)


def complete(server: RunningServer, model: str) -> httpx.Response:
    response = post(server, model)
    assert response.status_code == 200, response.text
    return response


def replica_metrics(server: RunningServer, timeout: float = 120) -> dict[str, str]:
    """Replica id -> the URL of its own metrics port, once two live replicas registered one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        groups = httpx.get(server.url + "/ray/targets", timeout=30).json()
        if len(groups) == 2:
            return {g["labels"]["replica"]: f"http://{g['targets'][0]}" for g in groups}
        time.sleep(1)
    raise AssertionError(f"replicas did not register their metrics ports: {groups}")


def test_adapters_stay_on_few_replicas_and_base_spreads(ray_server: RunningServer) -> None:
    served_by: dict[str, set[str]] = defaultdict(set)
    late: dict[str, set[str]] = defaultdict(set)
    for round_ in range(4):
        for name in ADAPTERS:
            response = complete(ray_server, name)
            assert response.headers["x-loraplex-adapter"] == f"{name}@v1"
            served_by[name].add(response.headers[REPLICA_HEADER])
            if round_ >= 2:
                late[name].add(response.headers[REPLICA_HEADER])
    base = {complete(ray_server, BASE_NAME).headers[REPLICA_HEADER] for _ in range(12)}
    assert len(base) == 2, "base-model requests all went to one replica"
    # Random routing puts each adapter on both replicas 7 times in 8 (4 requests each).
    assert sum(len(r) for r in served_by.values()) <= len(ADAPTERS) + 2, dict(served_by)
    assert all(len(r) == 1 for r in late.values()), dict(late)
    # Each replica's own metrics (found through /ray/targets) say the same.
    metrics = replica_metrics(ray_server)
    assert set(metrics) == {r for rs in served_by.values() for r in rs} | base
    for name in ADAPTERS:
        counted = {
            replica
            for replica, url in metrics.items()
            if metric_sum(url, "loraplex_requests_total", ADMIN_KEY, adapter=f"{name}@v1") > 0
        }
        assert counted == served_by[name], (name, counted, dict(served_by))


def test_streaming_through_the_router(ray_server: RunningServer) -> None:
    body = {
        "model": "a2",
        "messages": [{"role": "user", "content": "Count to five."}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream(
        "POST", ray_server.url + "/v1/chat/completions", json=body, headers=auth(), timeout=300
    ) as response:
        assert response.status_code == 200
        assert response.headers["x-loraplex-adapter"] == "a2@v1"
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event[len("data: ") :]) for event in events[:-1]]
    assert len(chunks) >= 3
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text


def test_unknown_adapter_is_404_through_the_router(ray_server: RunningServer) -> None:
    response = post(ray_server, "nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"]
    assert complete(ray_server, BASE_NAME).status_code == 200


def test_promote_reaches_both_replicas(ray_server: RunningServer, registry: Registry) -> None:
    assert complete(ray_server, "promo").headers["x-loraplex-adapter"] == "promo@v1"
    # `promote --preload`: every live server warms v2 and says so before the alias moves;
    # each replica is a server of its own
    outcome = registry.preload("promo@v2", timeout=300)
    assert len(outcome.acks) == 2 and not outcome.failed and not outcome.missing, outcome
    registry.promote("promo@v2")
    # the router resolves afresh: the next request is served by v2
    assert complete(ray_server, "promo").headers["x-loraplex-adapter"] == "promo@v2"


def test_tenant_limit_holds_across_replicas(ray_server: RunningServer) -> None:
    """``capped`` spends its requests/min on one replica (affinity keeps one adapter there);
    a request that goes to the other replica is refused too: the count is shared."""
    holder = {name: complete(ray_server, name).headers[REPLICA_HEADER] for name in ADAPTERS}
    elsewhere = next(name for name in ADAPTERS if holder[name] != holder["a0"])
    # the bucket refills one request per 60 / CAPPED_RPM s: the next requests come sooner
    first = [post(ray_server, "a0", "capped") for _ in range(CAPPED_RPM)]
    assert [r.status_code for r in first] == [200] * CAPPED_RPM
    here = holder["a0"]
    assert {r.headers[REPLICA_HEADER] for r in first} == {here}
    refused = post(ray_server, elsewhere, "capped")
    assert refused.status_code == 429, refused.text
    assert refused.headers[REPLICA_HEADER] != here
    assert int(refused.headers["retry-after"]) >= 1
    assert complete(ray_server, elsewhere).status_code == 200  # other tenants are not affected


def replica_processes(server: RunningServer) -> dict[str, psutil.Process]:
    """Replica id -> its process, matched by the metrics port the process listens on."""
    processes = [
        p
        for p in psutil.Process(server.process.pid).children(recursive=True)
        if "ServeReplica:loraplex-replicas" in " ".join(p.cmdline())
    ]
    by_port = {
        c.laddr.port: p
        for p in processes
        for c in p.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    }
    return {r: by_port[int(url.rpartition(":")[2])] for r, url in replica_metrics(server).items()}


def test_killed_replica_is_replaced_and_loses_no_request_that_had_not_started(
    ray_server: RunningServer,
) -> None:
    """Last in the module: one replica's process is killed while requests run on both.

    Requests in progress on it fail cleanly (503 + Retry-After from the router); every request
    sent after the kill is served (Ray Serve's router retries one that a dead replica never
    accepted on another); Ray starts a replacement, which serves."""
    processes = replica_processes(ray_server)
    assert len(processes) == 2, processes
    before = set(processes)
    victim = sorted(before)[0]
    victim_metrics = replica_metrics(ray_server)[victim]
    body = {
        "model": BASE_NAME,
        "prompt": "Once upon a time",
        "max_tokens": 128,
        "ignore_eos": True,  # so a request in progress cannot end before the kill
        "temperature": 0,
    }
    with ThreadPoolExecutor(6) as pool:
        running = [
            pool.submit(
                httpx.post,
                ray_server.url + "/v1/completions",
                json=body,
                headers=auth(),
                timeout=300,
            )
            for _ in range(6)
        ]
        deadline = time.monotonic() + 300
        while metric_sum(victim_metrics, "loraplex_requests_in_flight", ADMIN_KEY) < 1:
            assert time.monotonic() < deadline, "no request reached the replica to kill"
            assert not all(f.done() for f in running), "every request ended elsewhere first"
            time.sleep(0.2)
        processes[victim].kill()
        processes[victim].wait(60)
        during = [future.result() for future in running]
    for response in during:
        assert response.status_code in (200, 503), response.text
        if response.status_code == 503:
            assert response.json()["error"]["code"]
            assert response.headers["retry-after"] == "1"
    assert any(r.status_code == 503 for r in during), "the killed replica's requests succeeded"
    assert any(r.status_code == 200 for r in during)
    after = [complete(ray_server, model) for model in (BASE_NAME,) * 6 + ADAPTERS]
    assert victim not in {r.headers[REPLICA_HEADER] for r in after}
    # Ray replaces the dead replica: a new id registers its metrics port (the dead one's no
    # longer answers, so it is left out) and serves requests
    now = set(replica_metrics(ray_server, timeout=900))
    assert now - before and victim not in now, (before, now)
    (new,) = now - before
    deadline = time.monotonic() + 300
    served: set[str] = set()
    while new not in served:
        assert time.monotonic() < deadline, f"the replacement {new} served nothing: {served}"
        served |= {complete(ray_server, BASE_NAME).headers[REPLICA_HEADER] for _ in range(4)}
