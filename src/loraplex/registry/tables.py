"""The registry's tables (SQLAlchemy Core), the same on SQLite and PostgreSQL.

Unique constraints carry the invariants that concurrent writers must not break: one row per
``(name, number)`` and per ``(name, sha256)``, and an alias can only point at an existing
version (composite foreign key), so a version an alias points at cannot disappear.
``adapters.last_version`` only grows: a deleted ``N@vK`` is never reused for other weights.
Tenants own API keys (only a sha256 of each key is stored, looked up by its ``key_id``);
``usage`` holds one row of counters per tenant, adapter and minute, which writers add to.
Usage has no foreign key: chargeback records outlive a deleted tenant or adapter.
Columns added after a table first shipped are nullable, so ``database.ensure_schema`` can add
them to an older database in place.
This module declares tables; it runs no queries.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

SCHEMA_VERSION = "3"  # 2: tenants, api_keys, usage; 3: eval_results gate columns
metadata = MetaData()

info = Table(
    "registry_info",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

adapters = Table(
    "adapters",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("tenant", String(64), nullable=True),
    Column("description", Text, nullable=True),
    Column("fallback_to_base", Boolean, nullable=False, default=False),
    Column("last_version", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("created_by", String(128), nullable=False),
)

versions = Table(
    "versions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), ForeignKey("adapters.name"), nullable=False),
    Column("number", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("rank", Integer, nullable=False),
    Column("alpha", Float, nullable=False),
    Column("target_modules", JSON, nullable=False),
    Column("base_fingerprint", String(64), nullable=False),
    Column("tenant", String(64), nullable=True),
    Column("description", Text, nullable=True),
    Column("files", JSON, nullable=False),
    Column("manifest", JSON, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("created_by", String(128), nullable=False),
    UniqueConstraint("name", "number", name="uq_versions_name_number"),
    UniqueConstraint("name", "sha256", name="uq_versions_name_sha256"),
)

aliases = Table(
    "aliases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("alias", String(32), primary_key=True),
    Column("number", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("updated_by", String(128), nullable=False),
    ForeignKeyConstraint(
        ["name", "number"], ["versions.name", "versions.number"], name="fk_alias_version"
    ),
)

alias_events = Table(
    "alias_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), ForeignKey("adapters.name"), nullable=False, index=True),
    Column("alias", String(32), nullable=False),
    Column("action", String(16), nullable=False),
    Column("from_number", Integer, nullable=True),
    Column("to_number", Integer, nullable=False),
    Column("undone", Boolean, nullable=False, default=False),
    Column("forced", Boolean, nullable=False, default=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("by", String(128), nullable=False),
)

eval_results = Table(
    "eval_results",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False),
    Column("number", Integer, nullable=False),
    Column("suite", String(128), nullable=False),
    Column("passed", Boolean, nullable=True),
    Column("metrics", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("created_by", String(128), nullable=False),
    # the gate's verdicts (schema 3): what it was compared with, on which data and base
    Column("reference", String(128), nullable=True),
    Column("data_sha256", String(64), nullable=True),
    Column("base_fingerprint", String(64), nullable=True),
    ForeignKeyConstraint(
        ["name", "number"], ["versions.name", "versions.number"], name="fk_eval_version"
    ),
)

tenants = Table(
    "tenants",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("weight", Float, nullable=False),
    Column("rpm", Integer, nullable=True),
    Column("tpm", BigInteger, nullable=True),
    Column("max_concurrency", Integer, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(8), primary_key=True),
    Column("tenant", String(64), ForeignKey("tenants.name"), nullable=False, index=True),
    Column("key_hash", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

usage = Table(
    "usage",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("adapter", String(256), primary_key=True),
    Column("minute", DateTime(timezone=True), primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Index("ix_usage_minute", "minute"),
)

# ---- rollout (issue 12): alias generation, live servers, preload intents and their acks
counters = Table(
    "counters",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

servers = Table(
    "servers",
    metadata,
    Column("server_id", String(64), primary_key=True),
    Column("host", String(256), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("seen_at", DateTime(timezone=True), nullable=False, index=True),
)

preloads = Table(
    "preloads",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False),
    Column("number", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("created_by", String(128), nullable=False),
)

preload_acks = Table(
    "preload_acks",
    metadata,
    Column("preload_id", Integer, ForeignKey("preloads.id"), primary_key=True),
    Column("server_id", String(64), primary_key=True),
    Column("ok", Boolean, nullable=False),
    Column("message", Text, nullable=True),
    Column("at", DateTime(timezone=True), nullable=False),
)
