"""Read queries of the registry catalog: resolving a reference, loading adapters.

Functions take an open connection (the ``Catalog`` runs them in a read transaction) and
return records from ``records.py``. Nothing here writes.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Row, select

from loraplex.adapters import AdapterRef
from loraplex.errors import NotFound
from loraplex.registry import schema as s
from loraplex.registry.records import AdapterRecord, AliasEvent, EvalRecord, VersionRecord, utc


def version_record(row: Row[Any], fallback: bool = False) -> VersionRecord:
    """A ``VersionRecord`` from a ``versions`` row."""
    m = row._mapping
    return VersionRecord(
        name=m["name"],
        number=m["number"],
        sha256=m["sha256"],
        size=m["size"],
        rank=m["rank"],
        alpha=m["alpha"],
        target_modules=list(m["target_modules"]),
        base_fingerprint=m["base_fingerprint"],
        files=dict(m["files"]),
        tenant=m["tenant"],
        description=m["description"],
        manifest=m["manifest"],
        created_at=utc(m["created_at"]),
        created_by=m["created_by"],
        fallback_to_base=fallback,
    )


def resolve(conn: Connection, ref: AdapterRef, model: str) -> VersionRecord:
    """The version ``ref`` names now; ``NotFound`` says which part is unknown."""
    stmt = select(s.versions, s.adapters.c.fallback_to_base).join(
        s.adapters, s.adapters.c.name == s.versions.c.name
    )
    if ref.number is not None:
        stmt = stmt.where(s.versions.c.name == ref.name, s.versions.c.number == ref.number)
    else:
        stmt = stmt.join(
            s.aliases,
            (s.aliases.c.name == s.versions.c.name) & (s.aliases.c.number == s.versions.c.number),
        ).where(s.aliases.c.name == ref.name, s.aliases.c.alias == ref.alias)
    row = conn.execute(stmt).first()
    if row is not None:
        return version_record(row, bool(row.fallback_to_base))
    known = conn.execute(select(s.adapters.c.name).where(s.adapters.c.name == ref.name)).first()
    if known is None:
        raise NotFound(f"The model '{model}' does not exist.")
    if ref.number is not None:
        raise NotFound(
            f"The model '{model}' does not exist: {ref.name} has no version v{ref.number}."
        )
    raise NotFound(f"The model '{model}' does not exist: {ref.name} has no alias '{ref.alias}'.")


def adapters(conn: Connection, names: list[str] | None, full: bool) -> list[AdapterRecord]:
    """Adapters (all, or ``names``) with versions and aliases; ``full`` adds history, evals."""

    def where(table: Any) -> Any:
        return table.c.name.in_(names) if names is not None else True

    heads = {
        r.name: r
        for r in conn.execute(select(s.adapters).where(where(s.adapters)).order_by("name"))
    }
    versions: dict[str, list[VersionRecord]] = {n: [] for n in heads}
    for row in conn.execute(
        select(s.versions).where(where(s.versions)).order_by(s.versions.c.number)
    ):
        versions[row.name].append(version_record(row, heads[row.name].fallback_to_base))
    aliases: dict[str, dict[str, int]] = {n: {} for n in heads}
    for row in conn.execute(select(s.aliases).where(where(s.aliases)).order_by(s.aliases.c.alias)):
        aliases[row.name][row.alias] = row.number
    events: dict[str, list[AliasEvent]] = {n: [] for n in heads}
    evals: dict[str, list[EvalRecord]] = {n: [] for n in heads}
    if full:
        table = s.alias_events
        for row in conn.execute(select(table).where(where(table)).order_by(table.c.id)):
            events[row.name].append(
                AliasEvent(
                    row.alias,
                    row.action,
                    row.from_number,
                    row.to_number,
                    row.undone,
                    row.forced,
                    utc(row.at),
                    row.by,
                )
            )
        table = s.eval_results
        for row in conn.execute(select(table).where(where(table)).order_by(table.c.id)):
            evals[row.name].append(
                EvalRecord(
                    row.number,
                    row.suite,
                    row.passed,
                    dict(row.metrics),
                    utc(row.created_at),
                    row.created_by,
                )
            )
    return [
        AdapterRecord(
            name=n,
            tenant=h.tenant,
            description=h.description,
            fallback_to_base=h.fallback_to_base,
            last_version=h.last_version,
            created_at=utc(h.created_at),
            created_by=h.created_by,
            versions=versions[n],
            aliases=aliases[n],
            events=events[n],
            evals=evals[n],
        )
        for n, h in heads.items()
    ]
