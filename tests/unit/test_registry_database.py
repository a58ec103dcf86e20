"""Retried transactions and SQLite locking setup of the catalog database."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError

from loraplex.errors import Conflict, NotFound, Unavailable
from loraplex.registry.database import make_engine, normalize_url, transaction


def test_postgres_urls_use_psycopg3() -> None:
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"


def test_sqlite_pragmas(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'sub' / 'r.db'}")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000
    engine.dispose()


def test_retries_a_lost_race_then_succeeds(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    calls = []

    def flaky(conn) -> str:  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) < 3:
            raise IntegrityError("INSERT", {}, Exception("unique"))
        return "done"

    assert transaction(engine, flaky) == "done" and len(calls) == 3


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (IntegrityError("x", {}, Exception("unique")), Conflict),
        (OperationalError("x", {}, Exception("database is locked")), Unavailable),
    ],
)
def test_gives_up_with_a_loraplex_error(tmp_path: Path, error: Exception, expected: type) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")

    def always(conn) -> None:  # type: ignore[no-untyped-def]
        raise error

    with pytest.raises(expected):
        transaction(engine, always, attempts=3)


def test_loraplex_errors_are_not_retried(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    calls = []

    def refuse(conn) -> None:  # type: ignore[no-untyped-def]
        calls.append(1)
        raise NotFound("no such thing")

    with pytest.raises(NotFound):
        transaction(engine, refuse)
    assert calls == [1]
