"""Rollout through the registry database: which servers are alive, and preload intents.

Servers that share a registry record a heartbeat (``servers``). ``promote --preload`` writes a
preload intent (``preloads``) and bumps the generation counter; each server follows that
counter, sees the intent, loads the version into its engine and acknowledges it
(``preload_acks``, ok or the error). ``preload`` waits until every live server has answered,
or its timeout, and says which did not; the caller then moves the alias. Nothing here talks
to an engine or moves an alias.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, select, update

from loraplex.registry import tables as t
from loraplex.registry.catalog import bump_generation
from loraplex.registry.database import read, transaction


@dataclass(frozen=True)
class Preload:
    """A preload intent: warm ``name@v{number}``."""

    id: int
    name: str
    number: int


@dataclass(frozen=True)
class PreloadOutcome:
    """What the live servers answered: ``acks`` (server -> error or None), ``missing``."""

    acks: dict[str, str | None]
    missing: list[str]

    @property
    def failed(self) -> dict[str, str]:
        return {s: e for s, e in self.acks.items() if e is not None}


def _now() -> datetime:
    return datetime.now(UTC)


class Rollout:
    """Heartbeats, preload intents and acks in the registry database ``engine``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def heartbeat(self, server_id: str, host: str) -> None:
        """Record that ``server_id`` (at ``host``, e.g. its URL) is alive now."""

        def tx(conn: Connection) -> None:
            now = _now()
            where = t.servers.c.server_id == server_id
            if conn.execute(update(t.servers).where(where).values(seen_at=now)).rowcount:
                return
            conn.execute(
                t.servers.insert().values(
                    server_id=server_id, host=host, started_at=now, seen_at=now
                )
            )

        transaction(self.engine, tx)

    def leave(self, server_id: str) -> None:
        """Forget ``server_id`` (a server that stops on purpose)."""
        query = t.servers.delete().where(t.servers.c.server_id == server_id)
        transaction(self.engine, lambda conn: conn.execute(query))

    def live_servers(self, within_seconds: float) -> dict[str, str]:
        """Servers seen in the last ``within_seconds``: id -> host."""
        since = _now() - timedelta(seconds=within_seconds)
        query = select(t.servers.c.server_id, t.servers.c.host).where(t.servers.c.seen_at >= since)
        return read(self.engine, lambda conn: {r.server_id: r.host for r in conn.execute(query)})

    def request_preload(self, name: str, number: int, actor: str) -> int:
        """Record an intent to warm ``name@v{number}`` everywhere; returns its id."""

        def tx(conn: Connection) -> int:
            bump_generation(conn)
            values = {"name": name, "number": number, "created_at": _now(), "created_by": actor}
            return int(conn.execute(t.preloads.insert().values(**values)).inserted_primary_key[0])

        return transaction(self.engine, tx)

    def pending(self, server_id: str, since: datetime) -> list[Preload]:
        """Intents made after ``since`` that ``server_id`` has not answered yet."""
        answered = select(t.preload_acks.c.preload_id).where(
            t.preload_acks.c.server_id == server_id
        )
        query = (
            select(t.preloads)
            .where(t.preloads.c.created_at >= since, t.preloads.c.id.not_in(answered))
            .order_by(t.preloads.c.id)
        )
        return read(
            self.engine,
            lambda conn: [Preload(r.id, r.name, r.number) for r in conn.execute(query)],
        )

    def ack(self, preload_id: int, server_id: str, error: str | None) -> None:
        """``server_id`` has warmed the version (``error`` None) or could not."""
        values = {
            "preload_id": preload_id,
            "server_id": server_id,
            "ok": error is None,
            "message": error,
            "at": _now(),
        }
        transaction(self.engine, lambda conn: conn.execute(t.preload_acks.insert().values(values)))

    def acks(self, preload_id: int) -> dict[str, str | None]:
        """Answers so far: server id -> error, or None where it warmed the version."""
        query = select(t.preload_acks).where(t.preload_acks.c.preload_id == preload_id)
        return read(
            self.engine,
            lambda conn: {r.server_id: (None if r.ok else r.message) for r in conn.execute(query)},
        )

    def preload(
        self,
        name: str,
        number: int,
        actor: str,
        *,
        timeout: float,
        live_within: float,
        poll: float = 0.1,
    ) -> PreloadOutcome:
        """Ask every live server to warm ``name@v{number}`` and wait for their answers."""
        preload_id = self.request_preload(name, number, actor)
        deadline = time.monotonic() + timeout
        while True:
            live = self.live_servers(live_within)
            acks = self.acks(preload_id)
            missing = sorted(f"{s} ({h})" for s, h in live.items() if s not in acks)
            if not missing or time.monotonic() >= deadline:
                return PreloadOutcome(acks, missing)
            time.sleep(poll)
