"""Plain records the registry returns: versions, alias events, eval results, adapters (from
the catalog); tenants, API keys and usage totals (from the accounts).

Immutable dataclasses with JSON-friendly ``to_dict`` for ``--json`` output and the admin
API, and ``from_row`` to build each one from its table's row (the one place that knows a
row's columns). This module runs no queries and touches no storage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from loraplex.adapters import version_key

if TYPE_CHECKING:
    from sqlalchemy import Row


KEY_PREFIX = "lpx"
"""API keys read ``lpx-<key_id>-<secret>``."""


def _utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes; every stored time is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in data.items()}


@dataclass(frozen=True)
class NewVersion:
    """What a push records (the catalog adds number, times and the auto alias)."""

    name: str
    sha256: str
    size: int
    rank: int
    alpha: float
    target_modules: list[str]
    base_fingerprint: str
    files: dict[str, str]
    tenant: str | None = None
    description: str | None = None
    manifest: dict[str, Any] | None = None
    fallback_to_base: bool | None = None  # None: keep the name's policy (False for a new name)


@dataclass(frozen=True)
class VersionRecord:
    """One stored, immutable adapter version."""

    name: str
    number: int
    sha256: str
    size: int
    rank: int
    alpha: float
    target_modules: list[str]
    base_fingerprint: str
    files: dict[str, str]
    tenant: str | None
    description: str | None
    manifest: dict[str, Any] | None
    created_at: datetime
    created_by: str
    fallback_to_base: bool = False

    @classmethod
    def from_row(cls, row: Row[Any], fallback: bool = False) -> VersionRecord:
        """The record of a ``versions`` row; ``fallback`` comes from the adapter's row."""
        m = row._mapping
        return cls(
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
            created_at=_utc(m["created_at"]),
            created_by=m["created_by"],
            fallback_to_base=fallback,
        )

    @property
    def key(self) -> str:
        """``N@vK``."""
        return version_key(self.name, self.number)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({"version": self.key, **asdict(self)})


@dataclass(frozen=True)
class AliasEvent:
    """One move of an alias: promote, rollback, or the automatic first ``stable``."""

    alias: str
    action: str
    from_number: int | None
    to_number: int
    undone: bool
    forced: bool
    at: datetime
    by: str

    @classmethod
    def from_row(cls, row: Row[Any]) -> AliasEvent:
        """The record of an ``alias_events`` row."""
        return cls(
            row.alias,
            row.action,
            row.from_number,
            row.to_number,
            row.undone,
            row.forced,
            _utc(row.at),
            row.by,
        )

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


@dataclass(frozen=True)
class EvalRecord:
    """An eval result recorded against a version (``Registry.record_eval``)."""

    number: int
    suite: str
    passed: bool | None
    metrics: dict[str, Any]
    created_at: datetime
    created_by: str
    reference: str | None = None  # what a gate verdict compared with: "N@vK" or "base"
    data_sha256: str | None = None
    base_fingerprint: str | None = None

    @classmethod
    def from_row(cls, row: Row[Any]) -> EvalRecord:
        """The record of an ``eval_results`` row."""
        return cls(
            row.number,
            row.suite,
            row.passed,
            dict(row.metrics),
            _utc(row.created_at),
            row.created_by,
            row.reference,
            row.data_sha256,
            row.base_fingerprint,
        )

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


@dataclass(frozen=True)
class AdapterRecord:
    """An adapter name with its versions, aliases, alias history and eval results."""

    name: str
    tenant: str | None
    description: str | None
    fallback_to_base: bool
    last_version: int
    created_at: datetime
    created_by: str
    versions: list[VersionRecord] = field(default_factory=list)
    aliases: dict[str, int] = field(default_factory=dict)
    events: list[AliasEvent] = field(default_factory=list)
    evals: list[EvalRecord] = field(default_factory=list)

    @classmethod
    def from_row(
        cls,
        row: Row[Any],
        versions: list[VersionRecord],
        aliases: dict[str, int],
        events: list[AliasEvent],
        evals: list[EvalRecord],
    ) -> AdapterRecord:
        """The record of an ``adapters`` row with what the other tables hold for it."""
        return cls(
            name=row.name,
            tenant=row.tenant,
            description=row.description,
            fallback_to_base=row.fallback_to_base,
            last_version=row.last_version,
            created_at=_utc(row.created_at),
            created_by=row.created_by,
            versions=versions,
            aliases=aliases,
            events=events,
            evals=evals,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tenant": self.tenant,
            "description": self.description,
            "fallback_to_base": self.fallback_to_base,
            "created_at": self.created_at.isoformat(),
            "created_by": self.created_by,
            "aliases": {a: version_key(self.name, n) for a, n in self.aliases.items()},
            "versions": [v.to_dict() for v in self.versions],
            "events": [e.to_dict() for e in self.events],
            "evals": [e.to_dict() for e in self.evals],
        }


@dataclass(frozen=True)
class Tenant:
    """A tenant: its fair-share weight and limits (None: no limit)."""

    name: str
    weight: float
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    created_at: datetime

    @classmethod
    def from_row(cls, row: Row[Any]) -> Tenant:
        """The record of a ``tenants`` row."""
        m = row._mapping
        return cls(
            name=m["name"],
            weight=m["weight"],
            rpm=m["rpm"],
            tpm=m["tpm"],
            max_concurrency=m["max_concurrency"],
            created_at=_utc(m["created_at"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


@dataclass(frozen=True)
class ApiKey:
    """An API key's record; the secret is never stored, ``prefix`` is the part shown."""

    key_id: str
    tenant: str
    created_at: datetime
    revoked_at: datetime | None
    prefix: str

    @classmethod
    def from_row(cls, row: Row[Any]) -> ApiKey:
        """The record of an ``api_keys`` row."""
        return cls(
            key_id=row.key_id,
            tenant=row.tenant,
            created_at=_utc(row.created_at),
            revoked_at=_utc(row.revoked_at) if row.revoked_at else None,
            prefix=f"{KEY_PREFIX}-{row.key_id}",
        )

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({**asdict(self), "active": self.active})


@dataclass(frozen=True)
class UsageRow:
    """Requests and tokens of one tenant on one adapter version ``N@vK`` (or the base model's
    name): what a server reports, and the totals ``usage`` returns."""

    tenant: str
    adapter: str
    requests: int
    prompt_tokens: int
    completion_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
