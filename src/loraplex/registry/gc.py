"""``adapters gc``: find and remove blobs that no version references.

Safe while servers serve and others push. A push stores (or, for content already there,
re-stamps) its blobs before it records the version, and checks them again after; gc lists
the blobs first and reads the references second, so a blob a version already references is
never a candidate. Blobs put less than ``grace_seconds`` ago are kept (a push in flight has
put them but not recorded its version yet), and each candidate's time stamp is read again
just before it is deleted. Servers keep serving versions from their local caches; only
unreferenced content is removed. Dry run unless ``delete=True``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlalchemy import select

from loraplex.registry import tables as t
from loraplex.registry.blobs import BlobStore
from loraplex.registry.catalog import Catalog
from loraplex.registry.database import read


@dataclass
class GcReport:
    """What gc found: ``orphans`` (digest -> age in seconds), and what it did with them."""

    referenced: int
    kept_young: list[str] = field(default_factory=list)
    orphans: dict[str, float] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)


def referenced_digests(catalog: Catalog) -> set[str]:
    """Every blob digest a version records."""
    query = select(t.versions.c.files)
    rows = read(catalog.engine, lambda conn: list(conn.execute(query).scalars()))
    return {digest for files in rows for digest in files.values()}


def collect(
    catalog: Catalog, blobs: BlobStore, *, grace_seconds: float, delete: bool = False
) -> GcReport:
    """Find unreferenced blobs older than ``grace_seconds``; delete them if ``delete``."""
    listed = dict(blobs.stored())  # before the references: see the module docstring
    referenced = referenced_digests(catalog)
    report = GcReport(referenced=len(referenced & listed.keys()))
    now = time.time()
    for digest, stored_at in sorted(listed.items()):
        if digest in referenced:
            continue
        if now - stored_at < grace_seconds:
            report.kept_young.append(digest)
            continue
        report.orphans[digest] = now - stored_at
    if delete:
        for digest in report.orphans:
            stored_at = blobs.stored_at(digest)
            if stored_at is not None and time.time() - stored_at >= grace_seconds:
                blobs.delete(digest)
                report.deleted.append(digest)
    return report
