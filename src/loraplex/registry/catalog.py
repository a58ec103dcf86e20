"""The registry catalog: versions, aliases, alias history and eval results in SQL.

Every write runs in one retried transaction that first locks the adapter's row (``FOR
UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so concurrent pushes, promotes,
rollbacks and deletes of one name are serialized and none is lost. Reads resolve aliases on
every call, so a promote is seen at once by every process. Blobs are not handled here.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, func, select, update

from loraplex.adapters import DEFAULT_ALIAS, AdapterRef, version_key
from loraplex.errors import Conflict, NotFound
from loraplex.registry import queries, rows
from loraplex.registry import schema as s
from loraplex.registry.db import ensure_schema, make_engine, ping, read, transaction
from loraplex.registry.queries import version_record
from loraplex.registry.records import (
    AdapterRecord,
    NewVersion,
    VersionRecord,
)


class Catalog:
    """Adapter metadata in SQLite (default) or PostgreSQL."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.url = self.engine.url.render_as_string(hide_password=True)
        ensure_schema(self.engine)

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()

    # ---- writes -------------------------------------------------------------------------

    def add_version(self, new: NewVersion, actor: str) -> tuple[VersionRecord, bool]:
        """Record a version; returns ``(record, created)``. Identical content pushed again
        under the same name returns the existing version with ``created=False``."""

        def tx(conn: Connection) -> tuple[VersionRecord, bool]:
            row = rows.lock_adapter(conn, new.name)
            fallback = bool(new.fallback_to_base)
            if row is None:
                conn.execute(
                    s.adapters.insert().values(
                        name=new.name,
                        tenant=new.tenant,
                        description=new.description,
                        fallback_to_base=fallback,
                        last_version=0,
                        created_at=rows.now(),
                        created_by=actor,
                    )
                )
                tenant = new.tenant
            else:
                if new.tenant is not None and row.tenant != new.tenant:
                    raise Conflict(
                        f"Adapter '{new.name}' belongs to tenant {row.tenant!r}, not "
                        f"{new.tenant!r}; push under another name."
                    )
                tenant, fallback = row.tenant, row.fallback_to_base
                if new.fallback_to_base is not None and new.fallback_to_base != fallback:
                    fallback = new.fallback_to_base
                    conn.execute(
                        update(s.adapters)
                        .where(s.adapters.c.name == new.name)
                        .values(fallback_to_base=fallback)
                    )
                same = conn.execute(
                    select(s.versions).where(
                        s.versions.c.name == new.name, s.versions.c.sha256 == new.sha256
                    )
                ).first()
                if same is not None:
                    return version_record(same, fallback), False
            conn.execute(
                update(s.adapters)
                .where(s.adapters.c.name == new.name)
                .values(last_version=s.adapters.c.last_version + 1)
            )
            number = conn.execute(
                select(s.adapters.c.last_version).where(s.adapters.c.name == new.name)
            ).scalar_one()
            values = {
                "name": new.name,
                "number": number,
                "sha256": new.sha256,
                "size": new.size,
                "rank": new.rank,
                "alpha": new.alpha,
                "target_modules": new.target_modules,
                "base_fingerprint": new.base_fingerprint,
                "files": new.files,
                "tenant": tenant,
                "description": new.description,
                "manifest": new.manifest,
                "created_at": rows.now(),
                "created_by": actor,
            }
            conn.execute(s.versions.insert().values(**values))
            if row is None:
                rows.move_alias(conn, new.name, DEFAULT_ALIAS, number, None, actor)
                rows.event(conn, new.name, DEFAULT_ALIAS, "auto", to_number=number, by=actor)
            return version_record(rows.require_version(conn, new.name, number), fallback), True

        return transaction(self.engine, tx)

    def promote(
        self, name: str, number: int, alias: str, actor: str, *, forced: bool = False
    ) -> int | None:
        """Point ``alias`` at ``N@vK`` atomically; returns the version it pointed at before."""

        def tx(conn: Connection) -> int | None:
            rows.require_adapter(conn, name)
            rows.require_version(conn, name, number)
            current = rows.alias_number(conn, name, alias)
            if current != number:
                rows.move_alias(conn, name, alias, number, current, actor)
                rows.event(
                    conn,
                    name,
                    alias,
                    "promote",
                    from_number=current,
                    to_number=number,
                    forced=forced,
                    by=actor,
                )
            return current

        return transaction(self.engine, tx)

    def rollback(self, name: str, alias: str, actor: str) -> tuple[int, int]:
        """Move ``alias`` back to where the last not-yet-undone promote moved it from."""

        def tx(conn: Connection) -> tuple[int, int]:
            rows.require_adapter(conn, name)
            current = rows.alias_number(conn, name, alias)
            if current is None:
                raise NotFound(f"Adapter '{name}' has no alias '{alias}'.")
            last = conn.execute(
                select(s.alias_events)
                .where(
                    s.alias_events.c.name == name,
                    s.alias_events.c.alias == alias,
                    s.alias_events.c.action.in_(("promote", "auto")),
                    s.alias_events.c.undone.is_(False),
                )
                .order_by(s.alias_events.c.id.desc())
                .limit(1)
            ).first()
            if last is None or last.from_number is None:
                raise Conflict(f"{name}:{alias} has no earlier version to roll back to.")
            previous = last.from_number
            if (
                conn.execute(
                    select(s.versions.c.id).where(
                        s.versions.c.name == name, s.versions.c.number == previous
                    )
                ).first()
                is None
            ):
                raise Conflict(
                    f"{name}:{alias} would roll back to {version_key(name, previous)}, which was "
                    "deleted; promote a version explicitly."
                )
            rows.move_alias(conn, name, alias, previous, current, actor)
            conn.execute(
                update(s.alias_events).where(s.alias_events.c.id == last.id).values(undone=True)
            )
            rows.event(
                conn, name, alias, "rollback", from_number=current, to_number=previous, by=actor
            )
            return current, previous

        return transaction(self.engine, tx)

    def delete(self, name: str, number: int) -> VersionRecord:
        """Delete ``N@vK`` and its eval results; refused while an alias points at it."""

        def tx(conn: Connection) -> VersionRecord:
            rows.require_adapter(conn, name)
            row = rows.require_version(conn, name, number)
            pointing = conn.execute(
                select(s.aliases.c.alias).where(
                    s.aliases.c.name == name, s.aliases.c.number == number
                )
            ).scalars()
            held = sorted(pointing)
            if held:
                raise Conflict(
                    f"{version_key(name, number)} is what alias {', '.join(held)} points at; "
                    "promote another version to it first."
                )
            where = (s.eval_results.c.name == name, s.eval_results.c.number == number)
            conn.execute(s.eval_results.delete().where(*where))
            conn.execute(s.versions.delete().where(s.versions.c.id == row.id))
            return version_record(row)

        return transaction(self.engine, tx)

    def record_eval(
        self,
        name: str,
        number: int,
        suite: str,
        passed: bool | None,
        metrics: dict[str, Any],
        actor: str,
    ) -> None:
        """Store an eval result for ``N@vK`` (the eval gate reads these on promote)."""

        def tx(conn: Connection) -> None:
            rows.require_version(conn, name, number)
            conn.execute(
                s.eval_results.insert().values(
                    name=name,
                    number=number,
                    suite=suite,
                    passed=passed,
                    metrics=metrics,
                    created_at=rows.now(),
                    created_by=actor,
                )
            )

        transaction(self.engine, tx)

    # ---- reads --------------------------------------------------------------------------

    def resolve(self, ref: AdapterRef, model: str | None = None) -> VersionRecord:
        """The version ``ref`` names now (aliases are looked up on every call); ``model``
        is what the client sent, for the error message."""
        return read(self.engine, lambda conn: queries.resolve(conn, ref, model or str(ref)))

    def adapter(self, name: str) -> AdapterRecord:
        """One adapter with its versions, aliases, history and eval results."""
        found = self.adapters([name], full=True)
        if not found:
            raise NotFound(f"Adapter '{name}' does not exist; see `loraplex adapters list`.")
        return found[0]

    def adapters(
        self, names: list[str] | None = None, *, full: bool = False
    ) -> list[AdapterRecord]:
        """Adapters (all, or ``names``) with versions and aliases; ``full`` adds history."""
        return read(self.engine, lambda conn: queries.adapters(conn, names, full))

    def names(self, alias: str = DEFAULT_ALIAS) -> list[str]:
        """Names that have ``alias`` set (what a bare ``N`` can serve)."""
        query = select(s.aliases.c.name).where(s.aliases.c.alias == alias).order_by("name")
        return read(self.engine, lambda conn: list(conn.execute(query).scalars()))

    def version_count(self) -> int:
        """Number of stored versions (for tests and status)."""
        query = select(func.count()).select_from(s.versions)
        return read(self.engine, lambda conn: conn.execute(query).scalar_one())

    def check(self) -> None:
        """Raise ``Unavailable`` unless the database answers."""
        ping(self.engine)
