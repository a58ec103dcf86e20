"""Database connection for the registry catalog: engine setup and retried transactions.

SQLite (the default, a file under LORAPLEX_HOME) gets WAL, a busy timeout, foreign keys and
``BEGIN IMMEDIATE`` for writes, so that writers from several processes queue instead of
failing on lock upgrade; reads use a plain deferred ``BEGIN``. PostgreSQL URLs use psycopg 3.
``transaction`` retries a write when a concurrent writer won a race (unique violation,
lock timeout, serialization failure), so no push or promote is lost. With a ``timeout``,
PostgreSQL connects, statements and waits for a pooled connection are bounded by it, and a
pool that stays exhausted is ``Unavailable`` (503), not a crash. No queries live here.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from loraplex.errors import Conflict, Unavailable
from loraplex.registry import tables

T = TypeVar("T")
SQLITE_BUSY_MS = 30_000
_READ = "loraplex_read"


def normalize_url(url: str) -> str:
    """Use psycopg 3 for ``postgres://`` and ``postgresql://`` URLs."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str, timeout: float | None = None) -> Engine:
    """An engine for ``url`` with the locking behaviour described above; ``timeout`` (seconds)
    bounds PostgreSQL connects, statements and pool checkouts."""
    url = normalize_url(url)
    if not url.startswith("sqlite"):
        options: dict[str, Any] = {"pool_pre_ping": True, "pool_size": 5, "max_overflow": 5}
        if timeout is not None:
            options["pool_timeout"] = timeout
            options["connect_args"] = {
                "connect_timeout": max(2, math.ceil(timeout)),  # libpq: whole seconds, >= 2
                "options": f"-c statement_timeout={math.ceil(timeout * 1000)}",
            }
        return create_engine(url, **options)
    database = url.split("///", 1)[-1]
    if database and database != ":memory:":
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # SQLAlchemy's BEGIN below, not the driver's
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        read = conn.get_execution_options().get(_READ, False)
        conn.exec_driver_sql("BEGIN" if read else "BEGIN IMMEDIATE")

    return engine


def ensure_schema(engine: Engine) -> None:
    """Create missing tables, so a database made by an earlier version gets the new ones, and
    record the schema version (safe when several processes start at once)."""

    def create(conn: Connection) -> None:
        tables.metadata.create_all(conn)
        _add_new_columns(conn)
        where = tables.info.c.key == "schema_version"
        row = conn.execute(tables.info.select().where(where)).first()
        if row is None:
            conn.execute(
                tables.info.insert().values(key="schema_version", value=tables.SCHEMA_VERSION)
            )
        elif int(row.value) < int(tables.SCHEMA_VERSION):
            conn.execute(tables.info.update().where(where).values(value=tables.SCHEMA_VERSION))

    transaction(engine, create, retry_on=(IntegrityError, OperationalError, DBAPIError))


def _add_new_columns(conn: Connection) -> None:
    """``ALTER TABLE ... ADD COLUMN`` for each nullable column a table made by an earlier
    schema lacks (``create_all`` only creates missing tables)."""
    inspector = inspect(conn)
    for table in tables.metadata.sorted_tables:
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in have and column.nullable:
                kind = column.type.compile(dialect=conn.dialect)
                conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}")


def read(engine: Engine, fn: Callable[[Connection], T]) -> T:
    """Run ``fn`` in a read-only (deferred) transaction."""
    try:
        with engine.execution_options(**{_READ: True}).begin() as conn:
            return fn(conn)
    except PoolTimeout as exc:
        raise _pool_exhausted() from exc
    except (OperationalError, InterfaceError) as exc:
        raise Unavailable(f"The registry database cannot be read: {exc.orig}") from exc


def transaction(
    engine: Engine,
    fn: Callable[[Connection], T],
    *,
    attempts: int = 10,
    retry_on: tuple[type[Exception], ...] = (IntegrityError, OperationalError),
) -> T:
    """Run ``fn`` in a write transaction, retrying it from scratch when a concurrent writer
    won a race. loraplex errors raised by ``fn`` roll back and propagate at once."""
    for attempt in range(attempts):
        try:
            with engine.begin() as conn:
                return fn(conn)
        except PoolTimeout as exc:
            raise _pool_exhausted() from exc
        except retry_on as exc:
            if attempt == attempts - 1:
                if isinstance(exc, IntegrityError):
                    raise Conflict(
                        "The registry changed concurrently and the change could not be applied; "
                        "run the command again."
                    ) from exc
                raise Unavailable(f"The registry database is busy or unreachable: {exc}") from exc
            time.sleep(random.uniform(0, min(0.5, 0.01 * 2**attempt)))
    raise AssertionError("unreachable")


def _pool_exhausted() -> Unavailable:
    return Unavailable("Every registry database connection is busy; retry shortly.", retry_after=1)


def ping(engine: Engine) -> None:
    """Raise ``Unavailable`` unless the database answers."""
    read(engine, lambda conn: conn.execute(text("SELECT 1")).scalar_one())
