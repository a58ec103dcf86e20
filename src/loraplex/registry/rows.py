"""Row-level steps that catalog transactions are made of: lock an adapter's row, require a
version, read or move an alias, log an alias event. Each takes the open connection of the
caller's transaction; none commits. Messages of the errors raised are user-facing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Row, select, update

from loraplex.adapters import version_key
from loraplex.errors import NotFound
from loraplex.registry import schema as s


def now() -> datetime:
    """The current time in UTC (every stored time is UTC)."""
    return datetime.now(UTC)


def lock_adapter(conn: Connection, name: str) -> Row[Any] | None:
    """The adapter's row, locked until the transaction ends (FOR UPDATE; no-op on SQLite,
    whose BEGIN IMMEDIATE already holds the write lock); None if the name is new."""
    query = select(s.adapters).where(s.adapters.c.name == name).with_for_update()
    return conn.execute(query).first()


def require_adapter(conn: Connection, name: str) -> Row[Any]:
    """Like ``lock_adapter``, but ``NotFound`` for an unknown name."""
    row = lock_adapter(conn, name)
    if row is None:
        raise NotFound(f"Adapter '{name}' does not exist; see `loraplex adapters list`.")
    return row


def require_version(conn: Connection, name: str, number: int) -> Row[Any]:
    """The row of ``N@vK``; ``NotFound`` if there is none."""
    row = conn.execute(
        select(s.versions).where(s.versions.c.name == name, s.versions.c.number == number)
    ).first()
    if row is None:
        raise NotFound(f"Version {version_key(name, number)} does not exist.")
    return row


def alias_number(conn: Connection, name: str, alias: str) -> int | None:
    """The version number ``alias`` points at, or None."""
    query = select(s.aliases.c.number).where(s.aliases.c.name == name, s.aliases.c.alias == alias)
    return conn.execute(query).scalar()


def move_alias(
    conn: Connection, name: str, alias: str, number: int, current: int | None, actor: str
) -> None:
    """Point ``alias`` at ``number`` (insert when ``current`` is None, else update)."""
    values = {"number": number, "updated_at": now(), "updated_by": actor}
    if current is None:
        conn.execute(s.aliases.insert().values(name=name, alias=alias, **values))
    else:
        conn.execute(
            update(s.aliases)
            .where(s.aliases.c.name == name, s.aliases.c.alias == alias)
            .values(**values)
        )


def event(conn: Connection, name: str, alias: str, action: str, **values: Any) -> None:
    """Append an alias move to the audit trail."""
    conn.execute(
        s.alias_events.insert().values(
            name=name,
            alias=alias,
            action=action,
            at=now(),
            undone=values.pop("undone", False),
            forced=values.pop("forced", False),
            **values,
        )
    )
