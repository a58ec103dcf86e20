"""A fresh PostgreSQL database per test, on the server ``scripts/start_postgres.sh`` starts.

The server's URL comes from ``LORAPLEX_TEST_POSTGRES_URL``; without it a test skips locally
and FAILS under ``CI=true``, so CI never passes without having run the PostgreSQL cases.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, make_url

from loraplex.registry.database import normalize_url


def postgres_url() -> str:
    """The test PostgreSQL server URL; skip locally / fail in CI when it is not configured."""
    import pytest

    url = os.environ.get("LORAPLEX_TEST_POSTGRES_URL")
    if not url:
        message = "LORAPLEX_TEST_POSTGRES_URL is not set; start one with scripts/start_postgres.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return normalize_url(url)


@contextmanager
def fresh_database() -> Iterator[str]:
    """The URL of a new, empty database, dropped (connections and all) afterwards."""
    server = postgres_url()
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    name = f"loraplex_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
