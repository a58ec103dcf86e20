"""Two real servers (auth on) sharing one PostgreSQL registry and one S3-compatible blob store:
a key made with the CLI works on both, a key revoked with the CLI stops working on both within
seconds, `adapters promote --preload` warms the new version on both before the alias moves and
both serve it (and a rollback) within 1 s, and usage sent to both is in the database, exactly
as the responses reported it, once both have stopped.

PostgreSQL comes from ``LORAPLEX_TEST_POSTGRES_URL`` (``scripts/start_postgres.sh``); without
it this module skips locally and FAILS under ``CI=true`` (``loraplex.testing.postgres``).
The blob store is a ``moto_server`` (the ``s3_endpoint`` fixture).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import boto3
import httpx
import pytest

from loraplex.config import Settings
from loraplex.registry.accounts import Accounts
from loraplex.registry.models import UsageRow
from loraplex.registry.registry import open_accounts, open_registry
from loraplex.testing.launcher import RunningServer, loraplex_server, server_env, stop
from loraplex.testing.postgres import fresh_database
from loraplex.testing.scrape import metric_sum

pytestmark = pytest.mark.integration
BASE_NAME = "smollm2-135m"
ADAPTER = "random1"
REVOKE_DEADLINE_S = 30  # generous: the servers trust a lookup for 1 s
METRICS_KEY = "shared-metrics-key"
ROLLOUT_BOUND_S = 1.0  # issue 12: a promote or rollback reaches every server within 1 s


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="module")
def accounts(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Accounts]:
    """The shared database, as this test process sees it; tenants acme and metered."""
    opened = open_accounts(
        Settings(registry_url=database, home=tmp_path_factory.mktemp("accounts"))
    )
    opened.create_tenant("acme")
    opened.create_tenant("metered")
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def store(
    database: str,
    s3_endpoint: str,
    base_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    """Settings of the shared registry: ``database`` and a fresh bucket."""
    bucket = f"loraplex-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return {
        "registry_url": database,
        "blob_url": f"s3://{bucket}/adapters",
        "s3_endpoint_url": s3_endpoint,
        "base_model": str(base_model_dir),
        "home": str(tmp_path_factory.mktemp("pusher")),
    }


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory,
    base_model_dir: Path,
    make_random_adapter: Callable[..., Path],
    store: dict[str, str],
    accounts: Accounts,
) -> Iterator[list[RunningServer]]:
    """Two servers on the shared registry, each with its own home (so its own blob cache);
    ``random1`` v1 (stable) and v2 are pushed first."""
    root = tmp_path_factory.mktemp("shared")
    registry = open_registry(Settings(**store))
    for seed in (1, 2):
        registry.push(make_random_adapter(root / "adapters" / f"v{seed}", seed=seed), ADAPTER)
    registry.close()
    assert not {"LORAPLEX_BLOB_URL", "LORAPLEX_ADMIN_KEY"} & set(os.environ)
    with ExitStack() as stack:
        running = []
        for name in ("one", "two"):
            env = server_env(
                root / name,
                base_model_dir,
                registry_url=store["registry_url"],
                blob_url=store["blob_url"],
                s3_endpoint_url=store["s3_endpoint_url"],
                auth="on",
                key_cache_seconds=1,
                metrics_key=METRICS_KEY,
                usage_flush_seconds=1,
                served_model_name=BASE_NAME,
            )
            log = root / f"server-{name}.log"
            running.append(stack.enter_context(loraplex_server(log, env=env)))
        yield running


def cli(
    database: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``loraplex ARGS`` on the shared database (and ``env``)."""
    return subprocess.run(
        [sys.executable, "-m", "loraplex.cli", *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "LORAPLEX_REGISTRY_URL": database, **(env or {})},
    )


def cli_key(database: str, tenant: str) -> str:
    """A new key of ``tenant`` from ``loraplex keys create`` (the only line on stdout)."""
    key = cli(database, "keys", "create", tenant).stdout.strip()
    assert key.startswith("lpx-") and "\n" not in key
    return key


def post(server: RunningServer, key: str, body: dict) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=180,
    )


def completion(model: str = BASE_NAME, **extra: object) -> dict:
    return {"model": model, "prompt": "The sea is", "max_tokens": 4, "temperature": 0, **extra}


def test_a_key_made_with_the_cli_works_on_both(servers: list[RunningServer], database: str) -> None:
    key = cli_key(database, "acme")
    for server in servers:
        response = post(server, key, completion(ADAPTER))
        assert response.status_code == 200, response.text
        assert response.headers["x-loraplex-adapter"] == f"{ADAPTER}@v1"
        assert post(server, key + "x", completion()).status_code == 401


def test_a_key_revoked_with_the_cli_stops_on_both(
    servers: list[RunningServer], database: str
) -> None:
    key = cli_key(database, "acme")
    for server in servers:  # both have it cached now
        assert post(server, key, completion()).status_code == 200
    revoked = cli(database, "keys", "revoke", "-".join(key.split("-")[:2]))
    assert "revoked" in revoked.stdout
    deadline = time.monotonic() + REVOKE_DEADLINE_S
    for server in servers:
        while (response := post(server, key, completion())).status_code == 200:
            assert time.monotonic() < deadline, f"{server.url} still takes a revoked key"
            time.sleep(0.2)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"


def cache_misses(server: RunningServer) -> float:
    """Adapter loads this server has done (its ``loraplex_adapter_cache_misses`` counter)."""
    headers = {"Authorization": f"Bearer {METRICS_KEY}"}
    text = httpx.get(server.url + "/metrics", headers=headers, timeout=30).text
    (line,) = [x for x in text.splitlines() if x.startswith("loraplex_adapter_cache_misses_total")]
    return float(line.split()[-1])


def served_version(server: RunningServer, key: str) -> str:
    response = post(server, key, completion(ADAPTER))
    assert response.status_code == 200, response.text
    return response.headers["x-loraplex-adapter"]


def test_a_preloaded_promote_and_a_rollback_reach_both(
    servers: list[RunningServer], store: dict[str, str]
) -> None:
    key = cli_key(store["registry_url"], "acme")
    assert [served_version(s, key) for s in servers] == [f"{ADAPTER}@v1"] * 2
    for server in servers:  # each fetched v1 from the S3-compatible store into its own cache
        assert metric_sum(server.url, "loraplex_adapter_loads_total", METRICS_KEY, tier="remote")
    before = [cache_misses(s) for s in servers]
    env = {f"LORAPLEX_{k.upper()}": v for k, v in store.items()}
    # --force: these random adapters have no eval verdict; the gate has its own tests.
    promoted = cli(
        store["registry_url"],
        *("adapters", "promote", f"{ADAPTER}@v2", "--preload", "--force"),
        env=env,
    )
    assert "preloaded random1@v2 on 2 server(s)" in promoted.stderr, promoted.stderr
    assert "no answer within" not in promoted.stderr
    time.sleep(ROLLOUT_BOUND_S)
    assert [served_version(s, key) for s in servers] == [f"{ADAPTER}@v2"] * 2
    # warmed by the preload: serving v2 loaded nothing more (one miss each, the preload's)
    assert [cache_misses(s) for s in servers] == [misses + 1 for misses in before]
    cli(store["registry_url"], "adapters", "rollback", ADAPTER, env=env)
    time.sleep(ROLLOUT_BOUND_S)
    assert [served_version(s, key) for s in servers] == [f"{ADAPTER}@v1"] * 2


def test_usage_on_both_is_stored_once_they_stop(
    servers: list[RunningServer], database: str, accounts: Accounts
) -> None:
    key = cli_key(database, "metered")
    expected: dict[str, list[int]] = {}
    bodies = [
        completion(),
        completion(ADAPTER, max_tokens=6),
        completion(prompt=["One", "Two two"], n=2, temperature=1, seed=7),
    ]
    for server in servers:
        for body in bodies:
            response = post(server, key, body)
            assert response.status_code == 200, response.text
            usage = response.json()["usage"]
            counts = expected.setdefault(response.headers["x-loraplex-adapter"], [0, 0, 0])
            counts[0] += 1
            counts[1] += usage["prompt_tokens"]
            counts[2] += usage["completion_tokens"]
    for server in servers:  # SIGTERM: each writes what it has not flushed yet, then exits
        stop(server)
        assert server.process.returncode != -signal.SIGKILL, server.log_tail()
    assert accounts.usage(tenant="metered") == [
        UsageRow("metered", adapter, *counts) for adapter, counts in sorted(expected.items())
    ]
