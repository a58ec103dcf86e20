"""The adapter registry's API: push, promote, rollback, delete, list, show, resolve; and
``open_registry``, which builds one from ``Settings``. ``Registry.accounts`` (tenants, keys,
usage) shares its database; ``open_accounts`` opens just that database.

Ties validation, the blob store and the catalog together. A push copies the adapter's files
into a private staging folder first, so what is validated is exactly what is hashed and
stored. The version's ``sha256`` is the digest of its served content (config + weights;
see ``content_digest``), so pushing identical content again returns the existing version.
Blobs of deleted versions are kept (they are content-addressed and may be shared) until
``gc`` removes those no version references.

By default everything lives under LORAPLEX_HOME: ``registry/registry.db`` (SQLite),
``registry/blobs`` and ``cache/adapters``. The base model is read lazily, on first push, so
commands that do not validate (list, promote...) work before ``loraplex model prepare``.
"""

from __future__ import annotations

import getpass
import hashlib
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from loraplex.adapters import (
    CONFIG_FILE,
    DEFAULT_ALIAS,
    WEIGHTS_FILE,
    check_alias,
    check_name,
    parse_ref,
    parse_version_key,
)
from loraplex.config import Settings
from loraplex.errors import NotFound
from loraplex.registry.accounts import Accounts
from loraplex.registry.blob_cache import BlobCache
from loraplex.registry.blobs import BlobStore, open_blob_store, sha256_file
from loraplex.registry.catalog import Catalog
from loraplex.registry.database import ensure_schema, make_engine
from loraplex.registry.gc import GcReport, collect
from loraplex.registry.models import AdapterRecord, NewVersion, VersionRecord
from loraplex.registry.rollout import PreloadOutcome, Rollout
from loraplex.registry.validate import BaseSpec, check_size, collect_files, validate_adapter


def default_actor() -> str:
    """Who is acting, for the audit trail: the ``user`` setting, else the OS user."""
    try:
        return Settings().user or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def content_digest(files: dict[str, str]) -> str:
    """sha256 over the served files' names and digests (config and weights)."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        digest.update(f"{name}\0{files[name]}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class PushResult:
    """A pushed version, and whether this push created it (False: identical content)."""

    version: VersionRecord
    created: bool


class Registry:
    """Versioned LoRA adapters: metadata in a ``Catalog``, files in a ``BlobStore``."""

    def __init__(
        self,
        catalog: Catalog,
        blobs: BlobStore,
        cache: BlobCache,
        base: Callable[[], BaseSpec],
    ) -> None:
        self.catalog = catalog
        self.blobs = blobs
        self.cache = cache
        self._base_factory = base

    @cached_property
    def accounts(self) -> Accounts:
        """Tenants, API keys and usage, in the catalog's database."""
        return Accounts(self.catalog.engine)

    @cached_property
    def rollout(self) -> Rollout:
        """Live servers and preload intents, in the catalog's database."""
        return Rollout(self.catalog.engine)

    @cached_property
    def base(self) -> BaseSpec:
        """The base model adapters are validated against (read on first push)."""
        return self._base_factory()

    def push(
        self,
        folder: Path,
        name: str,
        *,
        tenant: str | None = None,
        description: str | None = None,
        fallback_to_base: bool | None = None,
        actor: str | None = None,
    ) -> PushResult:
        """Validate ``folder``, store its files and record ``N@vK`` (or return the twin)."""
        check_name(name)
        if tenant is not None:
            check_name(tenant)
        base = self.base
        files = collect_files(folder)
        check_size(files, name, base.max_bytes)
        with tempfile.TemporaryDirectory(prefix="loraplex-push-") as tmp:
            staging = Path(tmp)
            for file_name, path in files.items():
                shutil.copyfile(path, staging / file_name)
            checked = validate_adapter(staging, name, base)
            digests = {n: sha256_file(p) for n, p in checked.files.items()}
            for file_name, path in checked.files.items():
                self.blobs.put(digests[file_name], path)
            new = NewVersion(
                name=name,
                sha256=content_digest(digests),
                size=checked.size,
                rank=checked.rank,
                alpha=checked.alpha,
                target_modules=checked.target_modules,
                base_fingerprint=base.fingerprint,
                files=digests,
                tenant=tenant,
                description=description,
                manifest=checked.manifest,
                fallback_to_base=fallback_to_base,
            )
            record, created = self.catalog.add_version(new, actor or default_actor())
            for file_name, path in checked.files.items():  # a gc may have raced the push
                if not self.blobs.exists(digests[file_name]):
                    self.blobs.put(digests[file_name], path)
        return PushResult(record, created)

    def promote(
        self,
        version: str,
        alias: str = DEFAULT_ALIAS,
        *,
        force: bool = False,
        actor: str | None = None,
    ) -> tuple[str | None, str]:
        """Point ``alias`` at ``N@vK``; returns (previous key or None, new key).

        ``force`` is only recorded in the alias history; the eval gate is not checked here
        (``adapters promote`` asks ``loraplex.evals.gate.check_promotable`` first).
        """
        ref = parse_version_key(version)
        check_alias(alias)
        previous = self.catalog.promote(
            ref.name, ref.number or 0, alias, actor or default_actor(), forced=force
        )
        return (f"{ref.name}@v{previous}" if previous else None), str(ref)

    def preload(
        self,
        version: str,
        *,
        timeout: float = 120.0,
        live_within: float = 5.0,
        actor: str | None = None,
    ) -> PreloadOutcome:
        """Ask every server seen in the last ``live_within`` seconds to warm ``N@vK`` and wait
        (at most ``timeout``) for their answers; the alias is not moved here."""
        ref = parse_version_key(version)
        self.catalog.resolve(ref)  # NotFound before anything is asked of the servers
        return self.rollout.preload(
            ref.name,
            ref.number or 0,
            actor or default_actor(),
            timeout=timeout,
            live_within=live_within,
        )

    def rollback(
        self, name: str, alias: str = DEFAULT_ALIAS, *, actor: str | None = None
    ) -> tuple[str, str]:
        """Move ``alias`` back to the version it pointed at before; returns (from, to) keys."""
        check_name(name)
        check_alias(alias)
        old, new = self.catalog.rollback(name, alias, actor or default_actor())
        return f"{name}@v{old}", f"{name}@v{new}"

    def delete(self, version: str) -> VersionRecord:
        """Delete ``N@vK`` (refused while an alias points at it)."""
        ref = parse_version_key(version)
        return self.catalog.delete(ref.name, ref.number or 0)

    def record_eval(
        self,
        version: str,
        suite: str,
        passed: bool | None,
        metrics: dict[str, Any],
        actor: str | None = None,
        **gate: str | None,
    ) -> None:
        """Attach an eval result to ``N@vK``; ``gate``: ``reference``, ``data_sha256``,
        ``base_fingerprint`` of a gate verdict."""
        ref = parse_version_key(version)
        self.catalog.record_eval(
            ref.name, ref.number or 0, suite, passed, metrics, actor or default_actor(), **gate
        )

    def list(self) -> list[AdapterRecord]:
        """Every adapter with its versions and aliases."""
        return self.catalog.adapters()

    def show(self, name: str) -> AdapterRecord:
        """One adapter with versions, aliases, alias history and eval results."""
        check_name(name)
        return self.catalog.adapter(name)

    def resolve(self, model: str) -> VersionRecord:
        """``N`` (alias stable), ``N:alias`` or ``N@vK`` -> the version it names now."""
        return self.catalog.resolve(parse_ref(model), model)

    def local_folder(self, version: VersionRecord) -> Path:
        """A local folder with the version's files (fetched into the cache if needed)."""
        return self.cache.folder(version.sha256, _served(version))

    def held_folder(self, version: VersionRecord) -> Path | None:
        """``local_folder`` if the files are here already, else None (never fetches)."""
        return self.cache.held(version.sha256, _served(version))

    def gc(self, *, grace_seconds: float, delete: bool = False) -> GcReport:
        """Unreferenced blobs older than ``grace_seconds`` (deleted if ``delete``)."""
        return collect(self.catalog, self.blobs, grace_seconds=grace_seconds, delete=delete)

    def check(self) -> None:
        """Raise ``Unavailable`` unless the catalog and the blob store answer."""
        self.catalog.check()
        self.blobs.check()

    def close(self) -> None:
        """Release database connections."""
        self.catalog.close()


def registry_url(settings: Settings) -> str:
    """The catalog URL in effect."""
    return settings.registry_url or f"sqlite:///{settings.home / 'registry' / 'registry.db'}"


def blob_url(settings: Settings) -> str:
    """The blob store URL in effect."""
    return settings.blob_url or str(settings.home / "registry" / "blobs")


def base_spec(settings: Settings) -> BaseSpec:
    """The base model adapters must fit, with the server's rank and size limits."""
    from loraplex.basemodel import bundled_model_dir, describe

    base_dir = settings.base_model or bundled_model_dir(settings.models_dir)
    if not (base_dir / "config.json").is_file():
        raise NotFound(
            f"The base model {base_dir} is not prepared; run `loraplex model prepare` first."
        )
    return BaseSpec.of(describe(base_dir), settings)


def open_registry(settings: Settings | None = None) -> Registry:
    """The registry configured by ``settings`` (default: from the environment)."""
    settings = settings or Settings()
    blobs = open_blob_store(
        blob_url(settings),
        s3_endpoint_url=settings.s3_endpoint_url,
        timeout=settings.blob_timeout_seconds,
        fetch_timeout=settings.blob_fetch_timeout_seconds,
    )
    cache = BlobCache(
        settings.home / "cache" / "adapters", blobs, int(settings.blob_cache_gib * 2**30)
    )
    catalog = Catalog(registry_url(settings), settings.registry_timeout_seconds)
    return Registry(catalog, blobs, cache, lambda: base_spec(settings))


def open_accounts(settings: Settings | None = None) -> Accounts:
    """Tenants, keys and usage in the registry database of ``settings`` (no blob store: for
    servers of a plain adapters folder and for the ``tenants``/``keys``/``usage`` commands)."""
    settings = settings or Settings()
    engine = make_engine(registry_url(settings), settings.registry_timeout_seconds)
    ensure_schema(engine)
    return Accounts(engine)


def _served(version: VersionRecord) -> dict[str, str]:
    """The files the engine reads (config and weights) -> blob sha256."""
    return {n: d for n, d in version.files.items() if n in (CONFIG_FILE, WEIGHTS_FILE)}
