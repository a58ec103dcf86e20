"""Tenants, API keys and usage in the registry database (SQLite)."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select

from loraplex.config import Settings
from loraplex.errors import Conflict, InvalidRequest, NotFound
from loraplex.registry import tables
from loraplex.registry.accounts import Accounts, parse_time
from loraplex.registry.database import make_engine
from loraplex.registry.models import UsageRow
from loraplex.registry.registry import Registry, open_accounts

KEY_RE = re.compile(r"lpx-([0-9a-f]{8})-[A-Za-z0-9_-]{32,}")
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def accounts(registry: Registry) -> Accounts:
    """The accounts of a fresh SQLite registry (sharing the catalog's engine)."""
    return registry.accounts


def test_tenant_create_show_update_list_delete(accounts: Accounts) -> None:
    acme = accounts.create_tenant("acme", weight=2, rpm=60, max_concurrency=4)
    assert (acme.name, acme.weight, acme.rpm, acme.tpm, acme.max_concurrency) == (
        "acme",
        2.0,
        60,
        None,
        4,
    )
    assert acme.created_at.tzinfo is not None
    assert accounts.tenant("acme") == acme
    accounts.create_tenant("beta")
    assert [t.name for t in accounts.tenants()] == ["acme", "beta"]
    assert accounts.tenant("beta").weight == 1.0

    changed = accounts.update_tenant("acme", tpm=1000, rpm=None)
    assert (changed.weight, changed.rpm, changed.tpm, changed.max_concurrency) == (
        2.0,
        None,
        1000,
        4,
    )
    assert accounts.tenant("acme") == changed
    assert accounts.update_tenant("acme") == changed  # nothing given: nothing changes

    accounts.delete_tenant("acme")
    assert [t.name for t in accounts.tenants()] == ["beta"]
    with pytest.raises(NotFound, match="Tenant 'acme' does not exist"):
        accounts.tenant("acme")


def test_tenant_errors(accounts: Accounts) -> None:
    accounts.create_tenant("acme")
    with pytest.raises(Conflict, match="already exists") as info:
        accounts.create_tenant("acme", weight=3)
    assert info.value.status_code == 409
    assert accounts.tenant("acme").weight == 1.0
    for bad in ("Acme", "", "-x", "a/b", "x" * 65, "ac me"):
        with pytest.raises(InvalidRequest, match="Invalid tenant name"):
            accounts.create_tenant(bad)
    for weight in (0, -1, float("nan"), float("inf"), True, "2"):
        with pytest.raises(InvalidRequest, match="weight"):
            accounts.create_tenant("w", weight=weight)
    for limit in (0, -5, 1.5, True):
        with pytest.raises(InvalidRequest, match="rpm"):
            accounts.update_tenant("acme", rpm=limit)
    with pytest.raises(InvalidRequest, match="no field colour"):
        accounts.update_tenant("acme", colour="red")
    assert [t.name for t in accounts.tenants()] == ["acme"]
    for call in (
        lambda: accounts.update_tenant("nope", rpm=1),
        lambda: accounts.delete_tenant("nope"),
        lambda: accounts.create_key("nope"),
        lambda: accounts.keys("nope"),
        lambda: accounts.revoke_key("0badc0de"),
        lambda: accounts.revoke_key("not a key"),
    ):
        with pytest.raises(NotFound):
            call()


def test_key_create_authenticate_revoke(accounts: Accounts) -> None:
    accounts.create_tenant("acme", rpm=10)
    accounts.create_tenant("beta")
    record, key = accounts.create_key("acme")
    match = KEY_RE.fullmatch(key)
    assert match and match[1] == record.key_id
    assert (record.tenant, record.prefix, record.revoked_at) == (
        "acme",
        f"lpx-{record.key_id}",
        None,
    )
    other, other_key = accounts.create_key("acme")
    beta_record, beta_key = accounts.create_key("beta")
    assert len({record.key_id, other.key_id, beta_record.key_id}) == 3
    assert accounts.authenticate(key) == accounts.tenant("acme")
    assert accounts.authenticate(beta_key) == accounts.tenant("beta")
    assert [k.key_id for k in accounts.keys("acme")] == [record.key_id, other.key_id]

    revoked = accounts.revoke_key(record.key_id)
    assert revoked.revoked_at is not None and not revoked.active
    assert accounts.authenticate(key) is None
    assert accounts.authenticate(other_key) == accounts.tenant("acme")  # the other key still works
    assert accounts.revoke_key(record.prefix) == revoked  # idempotent, by id or shown prefix
    assert [k.active for k in accounts.keys("acme")] == [False, True]


def test_keys_of_a_deleted_tenant_fail(accounts: Accounts) -> None:
    accounts.create_tenant("acme")
    _, key = accounts.create_key("acme")
    accounts.delete_tenant("acme")
    assert accounts.authenticate(key) is None
    accounts.create_tenant("acme")  # the name again: the old key stays dead
    assert accounts.authenticate(key) is None and accounts.keys("acme") == []


def test_malformed_and_wrong_keys(accounts: Accounts) -> None:
    accounts.create_tenant("acme")
    record, key = accounts.create_key("acme")
    prefix, secret = key[:13], key[13:]
    last = "A" if key[-1] != "A" else "B"
    wrong = [
        "",
        "lpx-",
        record.prefix,
        key[:-1] + last,  # one character of the secret changed
        key + "x",
        key.upper(),
        "sk-" + key[4:],
        prefix + secret[:20],  # secret too short
        prefix + "!" * 32,
        f"lpx-{'0' * 8}{secret}",  # another key id with this secret
        " " + key,
        key + "\n",
    ]
    for candidate in wrong:
        assert accounts.authenticate(candidate) is None, candidate
    assert accounts.authenticate(None) is None  # type: ignore[arg-type]
    assert accounts.authenticate(key) is not None


def test_only_a_hash_of_the_key_is_stored(accounts: Accounts) -> None:
    accounts.create_tenant("acme")
    record, key = accounts.create_key("acme")
    secret = key[len(record.prefix) + 1 :]
    with accounts.engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(select(tables.api_keys))]
    assert len(rows) == 1
    dumped = repr(rows)
    assert secret not in dumped and key not in dumped
    assert hashlib.sha256(key.encode()).hexdigest() in dumped
    db_file = Path(accounts.engine.url.database or "")
    files = list(db_file.parent.glob(db_file.name + "*"))  # the database and its WAL
    assert db_file in files and not any(secret.encode() in f.read_bytes() for f in files)


def test_usage_adds_up_and_filters_by_time(accounts: Accounts) -> None:
    rows = [
        UsageRow("acme", "sales@v1", 1, 10, 5),
        UsageRow("acme", "smollm2-135m", 1, 3, 2),
        UsageRow("acme", "sales@v1", 2, 20, 7),  # same key in one call: added
        UsageRow("beta", "sales@v1", 1, 1, 1),
    ]
    accounts.record_usage(rows, at=T0 + timedelta(seconds=5))
    accounts.record_usage([UsageRow("acme", "sales@v1", 1, 1, 1)], at=T0 + timedelta(seconds=59))
    accounts.record_usage(
        [UsageRow("acme", "sales@v1", 4, 40, 40)], at=T0.replace(tzinfo=None) + timedelta(hours=1)
    )
    accounts.record_usage([UsageRow("beta", "x@v2", 1, 1, 1)], at=T0 - timedelta(minutes=1))
    accounts.record_usage([])
    assert accounts.usage() == [
        UsageRow("acme", "sales@v1", 8, 71, 53),
        UsageRow("acme", "smollm2-135m", 1, 3, 2),
        UsageRow("beta", "sales@v1", 1, 1, 1),
        UsageRow("beta", "x@v2", 1, 1, 1),
    ]
    first_hour = accounts.usage(T0, T0 + timedelta(hours=1))
    assert first_hour == [
        UsageRow("acme", "sales@v1", 4, 31, 13),
        UsageRow("acme", "smollm2-135m", 1, 3, 2),
        UsageRow("beta", "sales@v1", 1, 1, 1),
    ]
    plus_one = timezone(timedelta(hours=1))  # the same instants, written in another zone
    shifted = [(T0 + timedelta(hours=h)).astimezone(plus_one) for h in (0, 1)]
    assert accounts.usage(*shifted) == first_hour
    assert accounts.usage(since=T0 + timedelta(minutes=1)) == [
        UsageRow("acme", "sales@v1", 4, 40, 40)
    ]
    assert accounts.usage(until=T0) == [UsageRow("beta", "x@v2", 1, 1, 1)]
    assert accounts.usage(tenant="beta") == [
        UsageRow("beta", "sales@v1", 1, 1, 1),
        UsageRow("beta", "x@v2", 1, 1, 1),
    ]
    with pytest.raises(InvalidRequest):
        accounts.record_usage([UsageRow("acme", "sales@v1", -1, 0, 0)])


def test_parse_time() -> None:
    now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    assert parse_time("-1h", now) == now - timedelta(hours=1)
    assert parse_time("30m", now) == now - timedelta(minutes=30)
    assert parse_time("-7d", now) == now - timedelta(days=7)
    assert parse_time("2025-03-01T10:00Z") == datetime(2025, 3, 1, 10, tzinfo=UTC)
    assert parse_time("2025-03-01T10:00") == datetime(2025, 3, 1, 10, tzinfo=UTC)
    assert parse_time("2025-03-01T12:00+02:00") == datetime(2025, 3, 1, 10, tzinfo=UTC)
    for bad in ("yesterday", "-1y", "", "1 h"):
        with pytest.raises(InvalidRequest, match="Invalid time"):
            parse_time(bad)


def test_a_database_of_the_previous_version_gets_the_new_tables(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    old = [tables.info, tables.adapters, tables.versions, tables.aliases]
    old += [tables.alias_events, tables.eval_results]
    tables.metadata.create_all(engine, tables=old)
    with engine.begin() as conn:
        conn.execute(tables.info.insert().values(key="schema_version", value="1"))
    engine.dispose()

    accounts = open_accounts(Settings(registry_url=url, home=tmp_path))
    accounts.check()
    accounts.create_tenant("acme")
    _, key = accounts.create_key("acme")
    assert accounts.authenticate(key) == accounts.tenant("acme")
    with accounts.engine.connect() as conn:
        version = conn.execute(select(tables.info.c.value)).scalar_one()
    assert version == tables.SCHEMA_VERSION == "3"
    accounts.close()


@pytest.mark.parametrize("name", ["admin", "anonymous"])
def test_reserved_tenant_names(accounts, name: str) -> None:
    with pytest.raises(Conflict, match="reserved"):
        accounts.create_tenant(name)
