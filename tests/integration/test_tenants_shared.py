"""Two real servers (auth on) sharing one PostgreSQL registry: a key made with the CLI works on
both, a key revoked with the CLI stops working on both within seconds, and usage sent to both
is in the database, exactly as the responses reported it, once both have stopped.

PostgreSQL comes from ``LORAPLEX_TEST_POSTGRES_URL`` (``scripts/start_postgres.sh``); without
it this module skips locally and FAILS under ``CI=true`` (``loraplex.testing.postgres``).
Adapters come from a plain folder, so no blob store is needed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from loraplex.config import Settings
from loraplex.registry.accounts import Accounts
from loraplex.registry.models import UsageRow
from loraplex.registry.registry import open_accounts
from loraplex.testing.launcher import RunningServer, loraplex_server, server_env, stop
from loraplex.testing.postgres import fresh_database

pytestmark = pytest.mark.integration
BASE_NAME = "smollm2-135m"
ADAPTER = "random1"
REVOKE_DEADLINE_S = 30  # generous: the servers trust a lookup for 1 s


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
def servers(
    tmp_path_factory: pytest.TempPathFactory,
    base_model_dir: Path,
    make_random_adapter: Callable[..., Path],
    database: str,
    accounts: Accounts,
) -> Iterator[list[RunningServer]]:
    """Two servers on ``database``, each with its own home, over one adapters folder."""
    root = tmp_path_factory.mktemp("shared")
    make_random_adapter(root / "adapters" / ADAPTER, seed=1)
    assert not {"LORAPLEX_BLOB_URL", "LORAPLEX_ADMIN_KEY"} & set(os.environ)
    with ExitStack() as stack:
        running = []
        for name in ("one", "two"):
            env = server_env(
                root / name,
                base_model_dir,
                adapters_dir=root / "adapters",
                registry_url=database,
                auth="on",
                key_cache_seconds=1,
                usage_flush_seconds=1,
                served_model_name=BASE_NAME,
            )
            log = root / f"server-{name}.log"
            running.append(stack.enter_context(loraplex_server(log, env=env)))
        yield running


def cli(database: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``loraplex ARGS`` on the shared database."""
    return subprocess.run(
        [sys.executable, "-m", "loraplex.cli", *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "LORAPLEX_REGISTRY_URL": database},
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
        assert response.headers["x-loraplex-adapter"].startswith(f"{ADAPTER}@sha-")
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
