"""The registry catalog: every read and write of adapter metadata in SQL.

Versions, aliases, alias history and eval results live in the tables of ``tables.py``; the
connection, locking and retries come from ``database.py``; rows become ``models.py`` records.
Every write runs in one retried transaction that first locks the adapter's row (``FOR
UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so concurrent pushes, promotes,
rollbacks and deletes of one name are serialized and none is lost. Reads resolve aliases on
every call; every write also bumps the registry's ``generation`` counter, so a server can keep
resolved names in memory and check one number to know when to look again. Blobs are not
handled here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Row, select, update

from loraplex.adapters import DEFAULT_ALIAS, AdapterRef, version_key
from loraplex.errors import Conflict, NotFound
from loraplex.registry import tables as t
from loraplex.registry.database import ensure_schema, make_engine, ping, read, transaction
from loraplex.registry.models import (
    AdapterRecord,
    AliasEvent,
    EvalRecord,
    NewVersion,
    VersionRecord,
)

GENERATION = "generation"


class Catalog:
    """Adapter metadata in SQLite (default) or PostgreSQL."""

    def __init__(self, url: str, timeout: float | None = None) -> None:
        self.engine = make_engine(url, timeout)
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
            row = _lock_adapter(conn, new.name)
            bump_generation(conn)
            fallback = bool(new.fallback_to_base)
            if row is None:
                conn.execute(
                    t.adapters.insert().values(
                        name=new.name,
                        tenant=new.tenant,
                        description=new.description,
                        fallback_to_base=fallback,
                        last_version=0,
                        created_at=_now(),
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
                        update(t.adapters)
                        .where(t.adapters.c.name == new.name)
                        .values(fallback_to_base=fallback)
                    )
                same = conn.execute(
                    select(t.versions).where(
                        t.versions.c.name == new.name, t.versions.c.sha256 == new.sha256
                    )
                ).first()
                if same is not None:
                    return VersionRecord.from_row(same, fallback), False
            conn.execute(
                update(t.adapters)
                .where(t.adapters.c.name == new.name)
                .values(last_version=t.adapters.c.last_version + 1)
            )
            number = conn.execute(
                select(t.adapters.c.last_version).where(t.adapters.c.name == new.name)
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
                "created_at": _now(),
                "created_by": actor,
            }
            conn.execute(t.versions.insert().values(**values))
            if row is None:
                _move_alias(conn, new.name, DEFAULT_ALIAS, number, None, actor)
                _event(conn, new.name, DEFAULT_ALIAS, "auto", to_number=number, by=actor)
            return VersionRecord.from_row(_require_version(conn, new.name, number), fallback), True

        return transaction(self.engine, tx)

    def promote(
        self, name: str, number: int, alias: str, actor: str, *, forced: bool = False
    ) -> int | None:
        """Point ``alias`` at ``N@vK`` atomically; returns the version it pointed at before."""

        def tx(conn: Connection) -> int | None:
            _require_adapter(conn, name)
            _require_version(conn, name, number)
            current = _alias_number(conn, name, alias)
            if current != number:
                bump_generation(conn)
                _move_alias(conn, name, alias, number, current, actor)
                _event(
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
            _require_adapter(conn, name)
            current = _alias_number(conn, name, alias)
            if current is None:
                raise NotFound(f"Adapter '{name}' has no alias '{alias}'.")
            last = conn.execute(
                select(t.alias_events)
                .where(
                    t.alias_events.c.name == name,
                    t.alias_events.c.alias == alias,
                    t.alias_events.c.action.in_(("promote", "auto")),
                    t.alias_events.c.undone.is_(False),
                )
                .order_by(t.alias_events.c.id.desc())
                .limit(1)
            ).first()
            if last is None or last.from_number is None:
                raise Conflict(f"{name}:{alias} has no earlier version to roll back to.")
            previous = last.from_number
            if (
                conn.execute(
                    select(t.versions.c.id).where(
                        t.versions.c.name == name, t.versions.c.number == previous
                    )
                ).first()
                is None
            ):
                raise Conflict(
                    f"{name}:{alias} would roll back to {version_key(name, previous)}, which was "
                    "deleted; promote a version explicitly."
                )
            bump_generation(conn)
            _move_alias(conn, name, alias, previous, current, actor)
            conn.execute(
                update(t.alias_events).where(t.alias_events.c.id == last.id).values(undone=True)
            )
            _event(conn, name, alias, "rollback", from_number=current, to_number=previous, by=actor)
            return current, previous

        return transaction(self.engine, tx)

    def delete(self, name: str, number: int) -> VersionRecord:
        """Delete ``N@vK`` and its eval results; refused while an alias points at it."""

        def tx(conn: Connection) -> VersionRecord:
            _require_adapter(conn, name)
            row = _require_version(conn, name, number)
            pointing = conn.execute(
                select(t.aliases.c.alias).where(
                    t.aliases.c.name == name, t.aliases.c.number == number
                )
            ).scalars()
            held = sorted(pointing)
            if held:
                raise Conflict(
                    f"{version_key(name, number)} is what alias {', '.join(held)} points at; "
                    "promote another version to it first."
                )
            bump_generation(conn)
            where = (t.eval_results.c.name == name, t.eval_results.c.number == number)
            conn.execute(t.eval_results.delete().where(*where))
            conn.execute(t.versions.delete().where(t.versions.c.id == row.id))
            return VersionRecord.from_row(row)

        return transaction(self.engine, tx)

    def record_eval(
        self,
        name: str,
        number: int,
        suite: str,
        passed: bool | None,
        metrics: dict[str, Any],
        actor: str,
        *,
        reference: str | None = None,
        data_sha256: str | None = None,
        base_fingerprint: str | None = None,
    ) -> None:
        """Store an eval result for ``N@vK`` (a gate verdict also names its reference, the
        sha256 of its data and the base model's fingerprint)."""

        def tx(conn: Connection) -> None:
            _require_version(conn, name, number)
            conn.execute(
                t.eval_results.insert().values(
                    name=name,
                    number=number,
                    suite=suite,
                    passed=passed,
                    metrics=metrics,
                    created_at=_now(),
                    created_by=actor,
                    reference=reference,
                    data_sha256=data_sha256,
                    base_fingerprint=base_fingerprint,
                )
            )

        transaction(self.engine, tx)

    # ---- reads --------------------------------------------------------------------------

    def resolve(self, ref: AdapterRef, model: str | None = None) -> VersionRecord:
        """The version ``ref`` names now (aliases are looked up on every call); ``model``
        is what the client sent, for the error message, which says which part is unknown."""
        model = model or str(ref)

        def query(conn: Connection) -> VersionRecord:
            stmt = select(t.versions, t.adapters.c.fallback_to_base).join(
                t.adapters, t.adapters.c.name == t.versions.c.name
            )
            if ref.number is not None:
                stmt = stmt.where(t.versions.c.name == ref.name, t.versions.c.number == ref.number)
            else:
                stmt = stmt.join(
                    t.aliases,
                    (t.aliases.c.name == t.versions.c.name)
                    & (t.aliases.c.number == t.versions.c.number),
                ).where(t.aliases.c.name == ref.name, t.aliases.c.alias == ref.alias)
            row = conn.execute(stmt).first()
            if row is not None:
                return VersionRecord.from_row(row, bool(row.fallback_to_base))
            known = conn.execute(
                select(t.adapters.c.name).where(t.adapters.c.name == ref.name)
            ).first()
            if known is None:
                raise NotFound(f"The model '{model}' does not exist.")
            if ref.number is not None:
                raise NotFound(
                    f"The model '{model}' does not exist: {ref.name} has no version v{ref.number}."
                )
            raise NotFound(
                f"The model '{model}' does not exist: {ref.name} has no alias '{ref.alias}'."
            )

        return read(self.engine, query)

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
        return read(self.engine, lambda conn: _load_adapters(conn, names, full))

    def names(self, alias: str = DEFAULT_ALIAS) -> list[str]:
        """Names that have ``alias`` set (what a bare ``N`` can serve)."""
        query = select(t.aliases.c.name).where(t.aliases.c.alias == alias).order_by("name")
        return read(self.engine, lambda conn: list(conn.execute(query).scalars()))

    def generation(self) -> int:
        """A number that changes on every write of versions or aliases (one indexed read)."""
        return read(self.engine, read_generation)

    def check(self) -> None:
        """Raise ``Unavailable`` unless the database answers."""
        ping(self.engine)


# ---- steps of the methods above: each takes the open connection of the caller; none commits


def _load_adapters(conn: Connection, names: list[str] | None, full: bool) -> list[AdapterRecord]:
    """Adapters (all, or ``names``) with versions and aliases; ``full`` adds history, evals."""

    def where(table: Any) -> Any:
        return table.c.name.in_(names) if names is not None else True

    heads = {
        r.name: r
        for r in conn.execute(select(t.adapters).where(where(t.adapters)).order_by("name"))
    }
    versions: dict[str, list[VersionRecord]] = {n: [] for n in heads}
    for row in conn.execute(
        select(t.versions).where(where(t.versions)).order_by(t.versions.c.number)
    ):
        versions[row.name].append(VersionRecord.from_row(row, heads[row.name].fallback_to_base))
    aliases: dict[str, dict[str, int]] = {n: {} for n in heads}
    for row in conn.execute(select(t.aliases).where(where(t.aliases)).order_by(t.aliases.c.alias)):
        aliases[row.name][row.alias] = row.number
    events: dict[str, list[AliasEvent]] = {n: [] for n in heads}
    evals: dict[str, list[EvalRecord]] = {n: [] for n in heads}
    if full:
        table = t.alias_events
        for row in conn.execute(select(table).where(where(table)).order_by(table.c.id)):
            events[row.name].append(AliasEvent.from_row(row))
        table = t.eval_results
        for row in conn.execute(select(table).where(where(table)).order_by(table.c.id)):
            evals[row.name].append(EvalRecord.from_row(row))
    return [
        AdapterRecord.from_row(h, versions[n], aliases[n], events[n], evals[n])
        for n, h in heads.items()
    ]


def read_generation(conn: Connection) -> int:
    """The registry's generation counter (0 before the first write)."""
    query = select(t.counters.c.value).where(t.counters.c.key == GENERATION)
    return conn.execute(query).scalar() or 0


def bump_generation(conn: Connection) -> None:
    """Add one to the generation counter (a concurrent first insert is retried by the
    caller's ``transaction``)."""
    where = t.counters.c.key == GENERATION
    if conn.execute(update(t.counters).where(where).values(value=t.counters.c.value + 1)).rowcount:
        return
    conn.execute(t.counters.insert().values(key=GENERATION, value=1))


def _now() -> datetime:
    """The current time in UTC (every stored time is UTC)."""
    return datetime.now(UTC)


def _lock_adapter(conn: Connection, name: str) -> Row[Any] | None:
    """The adapter's row, locked until the transaction ends (FOR UPDATE; no-op on SQLite,
    whose BEGIN IMMEDIATE already holds the write lock); None if the name is new."""
    query = select(t.adapters).where(t.adapters.c.name == name).with_for_update()
    return conn.execute(query).first()


def _require_adapter(conn: Connection, name: str) -> Row[Any]:
    """Like ``_lock_adapter``, but ``NotFound`` for an unknown name."""
    row = _lock_adapter(conn, name)
    if row is None:
        raise NotFound(f"Adapter '{name}' does not exist; see `loraplex adapters list`.")
    return row


def _require_version(conn: Connection, name: str, number: int) -> Row[Any]:
    """The row of ``N@vK``; ``NotFound`` if there is none."""
    row = conn.execute(
        select(t.versions).where(t.versions.c.name == name, t.versions.c.number == number)
    ).first()
    if row is None:
        raise NotFound(f"Version {version_key(name, number)} does not exist.")
    return row


def _alias_number(conn: Connection, name: str, alias: str) -> int | None:
    """The version number ``alias`` points at, or None."""
    query = select(t.aliases.c.number).where(t.aliases.c.name == name, t.aliases.c.alias == alias)
    return conn.execute(query).scalar()


def _move_alias(
    conn: Connection, name: str, alias: str, number: int, current: int | None, actor: str
) -> None:
    """Point ``alias`` at ``number`` (insert when ``current`` is None, else update)."""
    values = {"number": number, "updated_at": _now(), "updated_by": actor}
    if current is None:
        conn.execute(t.aliases.insert().values(name=name, alias=alias, **values))
    else:
        conn.execute(
            update(t.aliases)
            .where(t.aliases.c.name == name, t.aliases.c.alias == alias)
            .values(**values)
        )


def _event(conn: Connection, name: str, alias: str, action: str, **values: Any) -> None:
    """Append an alias move to the audit trail."""
    conn.execute(
        t.alias_events.insert().values(
            name=name,
            alias=alias,
            action=action,
            at=_now(),
            undone=values.pop("undone", False),
            forced=values.pop("forced", False),
            **values,
        )
    )
