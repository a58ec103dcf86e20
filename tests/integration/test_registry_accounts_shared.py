"""Tenants, keys and usage shared by several servers through one registry database: SQLite
file and PostgreSQL (a fresh database per test, ``loraplex.testing.postgres``), each "server"
an ``Accounts`` on its own engine, in this process or in others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import astuple
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from loraplex.config import Settings
from loraplex.errors import NotFound
from loraplex.registry.accounts import Accounts
from loraplex.registry.models import UsageRow
from loraplex.registry.registry import open_accounts
from loraplex.testing.postgres import fresh_database

pytestmark = pytest.mark.integration
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
PROCESSES, THREADS, ROUNDS = 3, 4, 40
ROWS = [
    UsageRow("acme", "sales@v1", 1, 3, 2),
    UsageRow("acme", "smollm2-135m", 1, 1, 1),
    UsageRow("beta", "sales@v1", 1, 2, 0),
]


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    with fresh_database() as url:
        yield url


def _server(db_url: str, tmp_path: Path) -> Accounts:
    """The accounts one server opens: its own engine on the shared database."""
    return open_accounts(Settings(registry_url=db_url, home=tmp_path))


def test_keys_and_tenants_are_shared(db_url: str, tmp_path: Path) -> None:
    one, two = _server(db_url, tmp_path), _server(db_url, tmp_path)
    assert one.engine is not two.engine
    one.create_tenant("acme", rpm=100)
    record, key = one.create_key("acme")
    assert two.authenticate(key) == one.tenant("acme")
    two.update_tenant("acme", weight=3, rpm=None)
    assert one.authenticate(key) == two.tenant("acme")
    assert (one.tenant("acme").weight, one.tenant("acme").rpm) == (3.0, None)

    one.revoke_key(record.key_id)
    assert two.authenticate(key) is None
    assert [k.active for k in two.keys("acme")] == [False]

    _, second = two.create_key("acme")
    assert one.authenticate(second) is not None
    two.delete_tenant("acme")
    assert one.authenticate(second) is None
    with pytest.raises(NotFound):
        one.create_key("acme")
    one.close()
    two.close()


WORKER = textwrap.dedent(
    """
    import json, sys, time
    from concurrent.futures import ThreadPoolExecutor
    from datetime import datetime, timedelta
    from pathlib import Path
    from loraplex.config import Settings
    from loraplex.registry.models import UsageRow
    from loraplex.registry.registry import open_accounts

    url, home, go, job = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4])
    rows, t0 = [UsageRow(*r) for r in job["rows"]], datetime.fromisoformat(job["t0"])
    accounts = open_accounts(Settings(registry_url=url, home=home))

    def work(_: int) -> None:
        for i in range(job["rounds"]):
            accounts.record_usage(rows, at=t0 + timedelta(minutes=i % 2, seconds=i))

    while not go.exists():
        time.sleep(0.01)
    with ThreadPoolExecutor(job["threads"]) as pool:
        list(pool.map(work, range(job["threads"])))  # re-raises a failed thread's error
    accounts.close()
    """
)


def test_concurrent_usage_from_several_processes_adds_up(db_url: str, tmp_path: Path) -> None:
    _server(db_url, tmp_path).close()  # schema exists before the race
    go = tmp_path / "go"
    job = {"rows": [astuple(r) for r in ROWS], "t0": T0.isoformat(), "rounds": ROUNDS}
    job["threads"] = THREADS
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, db_url, str(tmp_path), str(go), json.dumps(job)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for _ in range(PROCESSES)
    ]
    time.sleep(1.0)  # the interpreters are importing; the go file releases them together
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err

    accounts = _server(db_url, tmp_path)
    n = PROCESSES * THREADS * ROUNDS  # record_usage calls, each adding every row once
    expected = [
        UsageRow(r.tenant, r.adapter, r.requests * n, r.prompt_tokens * n, r.completion_tokens * n)
        for r in ROWS
    ]
    assert accounts.usage() == expected, "a count was lost"
    half = [
        UsageRow(
            r.tenant, r.adapter, r.requests // 2, r.prompt_tokens // 2, r.completion_tokens // 2
        )
        for r in expected
    ]
    assert accounts.usage(T0, T0 + timedelta(minutes=1)) == half
    assert accounts.usage(T0 + timedelta(minutes=1)) == half
    accounts.close()
