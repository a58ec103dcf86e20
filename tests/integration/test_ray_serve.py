"""``loraplex serve --ray`` on a real local Ray cluster: two replicas of the bundled model,
sharing one registry in PostgreSQL (``LORAPLEX_TEST_POSTGRES_URL``; the module skips locally
without it and fails under ``CI=true``) and a ``moto_server`` S3 blob store, as on a cluster.

Requests for four adapters end with each adapter loaded on fewer replicas than random routing
would give (read from each replica's own ``/metrics``, found through ``/ray/targets``), base
model requests reach both replicas, streaming is relayed chunk by chunk, an unknown adapter is
a 404, a promote is served at once through the router after every replica warmed the new
version, a tenant's requests/min hold across both replicas, and when one replica's process is
killed while requests run, a stream in progress on it ends with an error event, other requests
in progress on it end with a clean 503, every request sent after the kill is served, and Ray
starts a replacement that serves. With ``merge_hot`` on, an adapter carrying one replica's
traffic is merged there and answers as before. One Ray cluster (a subprocess) for these tests;
before them, a server of its own autoscales between 1 and 2 replicas under load and after it.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
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
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,  # 6 clients: 3 replicas wanted (2 at most); 1 client: 1
    "metrics_interval_s": 2,  # how often the router's handle reports its requests (10 s)
    "look_back_period_s": 4,  # averaged over (30 s)
    "upscale_delay_s": 0,  # (30 s)
    # (600 s) long enough that a gap in the load does not stop the replica being started
    "downscale_delay_s": 10,
}
"""Ray Serve's autoscaling, made quick for a test (its defaults in parentheses)."""


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


@contextmanager
def serve_on_ray(
    home: Path,
    base_model_dir: Path,
    store: dict[str, str],
    log: str,
    *flags: str,
    **settings: object,
) -> Iterator[RunningServer]:
    """``loraplex serve --ray FLAGS`` on a local Ray cluster of its own, the shared registry,
    and ``settings`` (``field=value`` of ``Settings``)."""
    env = server_env(
        home,
        base_model_dir,
        **store,
        served_model_name=BASE_NAME,
        max_model_len=512,
        auth="on",
        admin_key=ADMIN_KEY,
        **settings,
    )
    env["OMP_NUM_THREADS"] = "1"  # two engines on the machine's cores
    # Ray kills workers once the node passes 95% memory, counting every process on the machine
    # (other test servers too): leave out-of-memory to the kernel in tests.
    env["RAY_memory_monitor_refresh_ms"] = "0"
    command = [sys.executable, "-m", "loraplex.cli", "serve", "--ray", *flags]
    command += ["--host", "127.0.0.1", "--port", "0", "--adapters-per-replica", "4"]
    with running_server(command, home / log, env=env, timeout=900) as running:
        yield running


@pytest.fixture(scope="module")
def ray_server(
    home: Path, base_model_dir: Path, registry: Registry, store: dict[str, str]
) -> Iterator[RunningServer]:
    # merge_hot on: ~230 tokens of one adapter alone on a replica merge it there
    # (test_a_hot_adapter_is_merged_on_its_replica); no other test here sends that many.
    with serve_on_ray(
        home, base_model_dir, store, "ray.log", "--replicas", "2",
        merge_hot="on", merge_hot_tokens=100,
    ) as running:  # fmt: skip
        yield running


@pytest.fixture
def autoscaled_server(
    home: Path, base_model_dir: Path, registry: Registry, store: dict[str, str]
) -> Iterator[RunningServer]:
    """1 to 2 replicas, autoscaled by Ray Serve on requests in progress and queued."""
    config = json.dumps(AUTOSCALING)
    with serve_on_ray(
        home, base_model_dir, store, "ray-autoscaled.log", "--autoscaling-config", config
    ) as running:
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


def replica_metrics(server: RunningServer, timeout: float = 120, count: int = 2) -> dict[str, str]:
    """Replica id -> the URL of its own metrics port, once ``count`` live replicas (no more,
    no fewer) have registered one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        groups = httpx.get(server.url + "/ray/targets", timeout=30).json()
        if len(groups) == count:
            return {g["labels"]["replica"]: f"http://{g['targets'][0]}" for g in groups}
        time.sleep(1)
    raise AssertionError(f"not {count} replicas with a metrics port: {groups}")


class Load:
    """``clients`` threads, each sending base-model requests one after another until the
    ``with`` block ends; a request that raises fails the block."""

    def __init__(self, server: RunningServer, clients: int) -> None:
        self.server = server
        self.clients = clients
        self.responses: list[httpx.Response] = []
        self.stop = threading.Event()

    def __enter__(self) -> Load:
        self.pool = ThreadPoolExecutor(self.clients)
        self.futures = [self.pool.submit(self.send) for _ in range(self.clients)]
        return self

    def send(self) -> None:
        body = {"model": BASE_NAME, "prompt": "Once upon a time", "max_tokens": 32}
        url = self.server.url + "/v1/completions"
        with httpx.Client(headers=auth(), timeout=300) as client:
            while not self.stop.is_set():  # long requests: each client has one in progress
                self.responses.append(client.post(url, json={**body, "ignore_eos": True}))

    def wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``done`` until it holds; raise if a client failed or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while not done():
            for future in self.futures:
                if future.done():
                    future.result()
            assert time.monotonic() < deadline, what
            time.sleep(0.5)

    def replicas(self) -> set[str]:
        """The replicas that served a request so far."""
        return {r.headers[REPLICA_HEADER] for r in list(self.responses) if r.is_success}

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        with self.pool:
            for future in self.futures:
                future.result()


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(
    autoscaled_server: RunningServer,
) -> None:
    """First in the module, so that this server's Ray cluster is gone before ``ray_server``'s
    starts. Six clients in a loop (6 requests in progress, target 2 per replica) make Ray
    Serve start a second replica, which serves; then one client alone (at most 1 in progress)
    makes it remove one (drained first). No request fails meanwhile."""
    server = autoscaled_server
    (first,) = replica_metrics(server, count=1)  # min_replicas
    with Load(server, 6) as load:
        load.wait(lambda: len(load.replicas()) == 2, 900, "no second replica served")
    assert first in load.replicas()
    with Load(server, 1) as light:
        # the removed replica's process has exited once its metrics port no longer answers
        (left,) = replica_metrics(server, timeout=600, count=1)
        sent = len(light.responses)
        light.wait(lambda: len(light.responses) >= sent + 3, 300, "the replica left is stuck")
    served = load.responses + light.responses
    assert {r.status_code for r in served} == {200}, [r.text for r in served if r.is_error]
    assert {r.headers[REPLICA_HEADER] for r in light.responses[sent:]} == {left}


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


def test_a_hot_adapter_is_merged_on_its_replica(ray_server: RunningServer) -> None:
    """``merge_hot`` reaches each replica's engine through Ray: an adapter that carries a
    replica's traffic is merged into that engine's base weights, and answers as before."""

    def story(number: int, max_tokens: int = 96) -> httpx.Response:
        body = {
            "model": "a3",
            "prompt": f"Story {number}:",
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        url = ray_server.url + "/v1/completions"
        response = httpx.post(url, json=body, headers=auth(), timeout=300)
        assert response.status_code == 200, response.text
        return response

    before = story(0, 16)
    replica = before.headers[REPLICA_HEADER]
    url = replica_metrics(ray_server)[replica]
    assert metric_sum(url, "loraplex_hot_merges_total", ADMIN_KEY) == 0
    for number in range(1, 6):  # one after another: the router keeps a3 on its replica
        assert story(number).headers[REPLICA_HEADER] == replica
    assert metric_sum(url, "loraplex_hot_merged", ADMIN_KEY, version="a3@v1") == 1
    assert metric_sum(url, "loraplex_hot_merges_total", ADMIN_KEY) == 1
    after = story(0, 16)
    assert after.headers[REPLICA_HEADER] == replica
    assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]


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

    A stream in progress on it ends with an error event and ``[DONE]``; other requests in
    progress on it fail cleanly (503 + Retry-After from the router); every request sent after
    the kill is served (Ray Serve's router retries one that a dead replica never accepted on
    another); Ray starts a replacement, which serves."""
    processes = replica_processes(ray_server)
    assert len(processes) == 2, processes
    before = set(processes)
    body = {
        "model": BASE_NAME,
        "prompt": "Once upon a time",
        "max_tokens": 128,
        "ignore_eos": True,  # so a request in progress cannot end before the kill
        "temperature": 0,
    }
    # the victim is the replica serving this stream (500 tokens: ~36 s on a slow 2-core
    # machine). Six requests are kept in flight from before it starts, so that one of them
    # runs beside it on the victim within seconds, long before the stream could end.
    streamed = {**body, "max_tokens": 500, "stream": True}
    url = ray_server.url + "/v1/completions"
    with ThreadPoolExecutor(6) as pool:
        running: list = []

        def keep_six_in_flight() -> None:
            missing = 6 - sum(not future.done() for future in running)
            running.extend(
                pool.submit(httpx.post, url, json=body, headers=auth(), timeout=300)
                for _ in range(missing)
            )

        keep_six_in_flight()
        with httpx.stream("POST", url, json=streamed, headers=auth(), timeout=300) as stream:
            assert stream.status_code == 200
            victim = stream.headers[REPLICA_HEADER]
            events = (line for line in stream.iter_lines() if line.startswith("data: "))
            assert "choices" in json.loads(next(events)[len("data: ") :])  # it has started
            started = time.monotonic()
            victim_metrics = replica_metrics(ray_server)[victim]
            # the stream and at least one of the requests
            while metric_sum(victim_metrics, "loraplex_requests_in_flight", ADMIN_KEY) < 2:
                assert time.monotonic() - started < 20, "no request reached the replica to kill"
                keep_six_in_flight()
                time.sleep(0.2)
            processes[victim].kill()
            processes[victim].wait(60)
            during = [future.result() for future in running]
            rest = list(events)  # ends, never hangs (or httpx's read timeout fails the test)
    assert rest[-1] == "data: [DONE]", rest[-3:]
    cut = json.loads(rest[-2][len("data: ") :])
    assert cut.get("error", {}).get("code") == "unavailable", rest[-3:]
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
