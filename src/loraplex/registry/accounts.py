"""Tenants, API keys and usage: every read and write of them in SQL.

They live in the registry database (``tables.py``), so every server on one registry shares
them: a key created or revoked anywhere is seen by the next ``authenticate`` everywhere. A key
reads ``lpx-<key_id>-<secret>``; only the sha256 of the whole key is stored, found by its
``key_id`` (the primary key) and compared in constant time. Usage is a counter per tenant,
adapter and minute that ``record_usage`` adds to with one upsert, so concurrent servers lose
no count. Connections, locking and retries come from ``database.py``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Row, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from loraplex.adapters import check_name
from loraplex.errors import Conflict, InvalidRequest, NotFound
from loraplex.registry import tables as t
from loraplex.registry.database import ping, read, transaction
from loraplex.registry.models import KEY_PREFIX, ApiKey, Tenant, UsageRow

SECRET_BYTES = 24  # token_urlsafe: 32 characters
_KEY_RE = re.compile(rf"{KEY_PREFIX}-([0-9a-f]{{8}})-[A-Za-z0-9_-]{{32,128}}")
_KEY_ID_RE = re.compile(rf"(?:{KEY_PREFIX}-)?([0-9a-f]{{8}})")
_LIMITS = ("rpm", "tpm", "max_concurrency")
_COUNTERS = ("requests", "prompt_tokens", "completion_tokens")
_AGES = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_AGE_RE = re.compile(r"-?([0-9]{1,9})([smhdw])")


RESERVED_TENANTS = ("admin", "anonymous")
"""Names the server uses for the admin key and for callers when auth is off."""


class Accounts:
    """Tenants, their API keys and their usage, on the registry's database engine (whose
    schema ``ensure_schema`` has created: ``Catalog`` and ``open_accounts`` do)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()

    def check(self) -> None:
        """Raise ``Unavailable`` unless the database answers."""
        ping(self.engine)

    # ---- tenants ------------------------------------------------------------------------

    def create_tenant(
        self,
        name: str,
        *,
        weight: float = 1.0,
        rpm: int | None = None,
        tpm: int | None = None,
        max_concurrency: int | None = None,
    ) -> Tenant:
        """Add a tenant; ``Conflict`` if the name is taken or reserved."""
        check_name(name, "tenant")
        if name in RESERVED_TENANTS:
            raise Conflict(
                f"'{name}' is reserved: usage of the admin key and of servers without auth is "
                "recorded under it. Choose another name."
            )
        values = _checked(weight=weight, rpm=rpm, tpm=tpm, max_concurrency=max_concurrency)

        def tx(conn: Connection) -> Tenant:
            if _tenant_row(conn, name, lock=True) is not None:
                raise Conflict(f"Tenant '{name}' already exists; see `loraplex tenants show`.")
            conn.execute(t.tenants.insert().values(name=name, created_at=_now(), **values))
            return Tenant.from_row(_require_tenant(conn, name))

        return transaction(self.engine, tx)

    def update_tenant(self, name: str, **changes: Any) -> Tenant:
        """Change only the given fields (``weight``, ``rpm``, ``tpm``, ``max_concurrency``;
        a limit of None removes it)."""
        unknown = sorted(set(changes) - {"weight", *_LIMITS})
        if unknown:
            raise InvalidRequest(f"Tenants have no field {', '.join(unknown)}.")
        values = _checked(**changes)

        def tx(conn: Connection) -> Tenant:
            _require_tenant(conn, name, lock=True)
            if values:
                conn.execute(update(t.tenants).where(t.tenants.c.name == name).values(**values))
            return Tenant.from_row(_require_tenant(conn, name))

        return transaction(self.engine, tx)

    def tenant(self, name: str) -> Tenant:
        """One tenant; ``NotFound`` if unknown."""
        return read(self.engine, lambda conn: Tenant.from_row(_require_tenant(conn, name)))

    def tenants(self) -> list[Tenant]:
        """Every tenant, by name."""
        query = select(t.tenants).order_by(t.tenants.c.name)
        return read(self.engine, lambda conn: [Tenant.from_row(r) for r in conn.execute(query)])

    def delete_tenant(self, name: str) -> None:
        """Delete a tenant and its keys (which stop working at once); its usage is kept."""

        def tx(conn: Connection) -> None:
            _require_tenant(conn, name, lock=True)
            conn.execute(t.api_keys.delete().where(t.api_keys.c.tenant == name))
            conn.execute(t.tenants.delete().where(t.tenants.c.name == name))

        transaction(self.engine, tx)

    # ---- API keys -----------------------------------------------------------------------

    def create_key(self, tenant: str) -> tuple[ApiKey, str]:
        """A new key of ``tenant``: (its record, the full key, which is not stored)."""

        def tx(conn: Connection) -> tuple[ApiKey, str]:
            _require_tenant(conn, tenant, lock=True)
            key_id = secrets.token_hex(4)  # a taken id fails the insert; the retry draws anew
            key = f"{KEY_PREFIX}-{key_id}-{secrets.token_urlsafe(SECRET_BYTES)}"
            conn.execute(
                t.api_keys.insert().values(
                    key_id=key_id, tenant=tenant, key_hash=_digest(key), created_at=_now()
                )
            )
            return ApiKey.from_row(_require_key(conn, key_id)), key

        return transaction(self.engine, tx)

    def keys(self, tenant: str) -> list[ApiKey]:
        """The keys of ``tenant``, revoked ones included, oldest first."""

        def query(conn: Connection) -> list[ApiKey]:
            _require_tenant(conn, tenant)
            rows = conn.execute(
                select(t.api_keys)
                .where(t.api_keys.c.tenant == tenant)
                .order_by(t.api_keys.c.created_at, t.api_keys.c.key_id)
            )
            return [ApiKey.from_row(r) for r in rows]

        return read(self.engine, query)

    def revoke_key(self, key_id: str) -> ApiKey:
        """Revoke a key, given its id or its shown prefix ``lpx-<key_id>``; revoking it again
        changes nothing."""
        match = _KEY_ID_RE.fullmatch(key_id) if isinstance(key_id, str) else None
        if match is None:
            raise NotFound(f"API key {key_id!r} does not exist; see `loraplex keys list TENANT`.")

        def tx(conn: Connection) -> ApiKey:
            row = _require_key(conn, match[1])
            if row.revoked_at is None:
                conn.execute(
                    update(t.api_keys)
                    .where(t.api_keys.c.key_id == row.key_id)
                    .values(revoked_at=_now())
                )
                row = _require_key(conn, row.key_id)
            return ApiKey.from_row(row)

        return transaction(self.engine, tx)

    def authenticate(self, key: str) -> Tenant | None:
        """The tenant ``key`` belongs to; None for a malformed, unknown or revoked key."""
        match = _KEY_RE.fullmatch(key) if isinstance(key, str) else None
        if match is None:
            return None
        query = (
            select(t.api_keys.c.key_hash, t.api_keys.c.revoked_at, t.tenants)
            .join(t.tenants, t.tenants.c.name == t.api_keys.c.tenant)
            .where(t.api_keys.c.key_id == match[1])
        )
        row = read(self.engine, lambda conn: conn.execute(query).first())
        if row is None or row.revoked_at is not None:
            return None
        if not hmac.compare_digest(row.key_hash, _digest(key)):
            return None
        return Tenant.from_row(row)

    # ---- usage --------------------------------------------------------------------------

    def record_usage(self, rows: Iterable[UsageRow], at: datetime | None = None) -> None:
        """Add ``rows`` to the counters of the minute of ``at`` (default now), in one
        transaction; concurrent writers add up."""
        minute = _utc(at or _now()).replace(second=0, microsecond=0)
        totals: dict[tuple[str, str], dict[str, int]] = {}
        for row in rows:
            counts = {c: getattr(row, c) for c in _COUNTERS}
            if min(counts.values()) < 0 or len(row.tenant) > 64 or len(row.adapter) > 256:
                raise InvalidRequest(f"Invalid usage row {row}.")
            total = totals.setdefault((row.tenant, row.adapter), dict.fromkeys(_COUNTERS, 0))
            for c, n in counts.items():
                total[c] += n
        if not totals:
            return
        # one order for every writer, so that concurrent upserts cannot deadlock
        params = [
            {"tenant": tenant, "adapter": adapter, "minute": minute, **counts}
            for (tenant, adapter), counts in sorted(totals.items())
        ]

        def tx(conn: Connection) -> None:
            insert = (postgresql if conn.dialect.name == "postgresql" else sqlite).insert(t.usage)
            upsert = insert.on_conflict_do_update(
                index_elements=[t.usage.c.tenant, t.usage.c.adapter, t.usage.c.minute],
                set_={c: t.usage.c[c] + insert.excluded[c] for c in _COUNTERS},
            )
            conn.execute(upsert, params)

        transaction(self.engine, tx)

    def usage(
        self,
        since: datetime | None = None,
        until: datetime | None = None,
        *,
        tenant: str | None = None,
    ) -> list[UsageRow]:
        """Totals per (tenant, adapter) over the minutes that start in [since, until), sorted;
        ``tenant`` keeps one tenant's rows."""
        sums = [func.sum(t.usage.c[c]).label(c) for c in _COUNTERS]
        query = (
            select(t.usage.c.tenant, t.usage.c.adapter, *sums)
            .group_by(t.usage.c.tenant, t.usage.c.adapter)
            .order_by(t.usage.c.tenant, t.usage.c.adapter)
        )
        if since is not None:
            query = query.where(t.usage.c.minute >= _utc(since))
        if until is not None:
            query = query.where(t.usage.c.minute < _utc(until))
        if tenant is not None:
            query = query.where(t.usage.c.tenant == tenant)
        return read(
            self.engine,
            lambda conn: [
                UsageRow(r.tenant, r.adapter, *(int(r._mapping[c]) for c in _COUNTERS))
                for r in conn.execute(query)
            ],
        )


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (naive means UTC) or an age before ``now``: ``-1h``, ``30m``, ``7d``
    (units s, m, h, d, w); in UTC."""
    age = _AGE_RE.fullmatch(text.strip())
    if age:
        return (now or _now()) - timedelta(seconds=int(age[1]) * _AGES[age[2]])
    try:
        return _utc(datetime.fromisoformat(text.strip()))
    except ValueError:
        raise InvalidRequest(
            f"Invalid time {text!r}: give an ISO 8601 time (2025-01-31T12:00Z) or an age such "
            "as -1h, -30m, -7d."
        ) from None


# ---- steps of the methods above: each takes the open connection of the caller; none commits


def _checked(**values: Any) -> dict[str, Any]:
    """``values`` if the weight is a positive number and each limit None or a positive int."""
    if "weight" in values:
        weight = values["weight"]
        ok = isinstance(weight, int | float) and not isinstance(weight, bool)
        if not ok or not math.isfinite(weight) or weight <= 0:
            raise InvalidRequest(f"A tenant's weight must be a number > 0, not {weight!r}.")
        values["weight"] = float(weight)
    for name in _LIMITS:
        limit = values.get(name)
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or limit < 1
        ):
            raise InvalidRequest(f"A tenant's {name} must be a whole number >= 1 or none.")
    return values


def _digest(key: str) -> str:
    """What is stored of a key: its sha256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def _now() -> datetime:
    """The current time in UTC (every stored time is UTC)."""
    return datetime.now(UTC)


def _utc(value: datetime) -> datetime:
    """``value`` in UTC; a naive time is taken as UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _tenant_row(conn: Connection, name: str, *, lock: bool = False) -> Row[Any] | None:
    """The tenant's row, or None; ``lock`` holds it until the transaction ends (FOR UPDATE;
    SQLite's writes hold the database lock already)."""
    query = select(t.tenants).where(t.tenants.c.name == name)
    return conn.execute(query.with_for_update() if lock else query).first()


def _require_tenant(conn: Connection, name: str, *, lock: bool = False) -> Row[Any]:
    """Like ``_tenant_row``, but ``NotFound`` for an unknown tenant."""
    row = _tenant_row(conn, name, lock=lock)
    if row is None:
        raise NotFound(f"Tenant '{name}' does not exist; see `loraplex tenants list`.")
    return row


def _require_key(conn: Connection, key_id: str) -> Row[Any]:
    """The row of key ``key_id``, locked until the transaction ends; ``NotFound`` if unknown."""
    query = select(t.api_keys).where(t.api_keys.c.key_id == key_id).with_for_update()
    row = conn.execute(query).first()
    if row is None:
        raise NotFound(f"API key '{key_id}' does not exist; see `loraplex keys list TENANT`.")
    return row
