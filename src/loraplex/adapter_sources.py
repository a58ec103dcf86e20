"""Where the server finds adapters: a plain folder, or the registry (``AdapterSource``).

Both turn the ``model`` a client sent into a ``ResolvedAdapter``: an immutable version key
and a local folder holding ``adapter_config.json`` + ``adapter_model.safetensors``. The
engine gives one LoRA id per version key, so a key must never name other weights.

The registry source looks the alias up again on every ``resolve``, so a promote or rollback
is seen by every server at once; a version recorded against another base model, or above
this server's rank limit, is refused (409) before it reaches the engine. Each lookup is
bounded in time; while the registry is down, what this server resolved in the last
``stale_seconds`` is served from memory and anything else is a 503 at once (``outage.py``).
``resolve`` does blocking I/O (files, database, maybe a download): call it from a worker
thread in async code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from loraplex.adapters import (
    CONFIG_FILE,
    DEFAULT_ALIAS,
    NAME_RE,
    WEIGHTS_FILE,
    MayUse,
    ResolvedAdapter,
    anyone,
    unknown_model,
)
from loraplex.errors import IncompatibleAdapter, NotFound, Unavailable
from loraplex.registry.outage import BoundedCaller, LastKnownGood

if TYPE_CHECKING:
    from loraplex.basemodel import BaseModelInfo
    from loraplex.config import Settings
    from loraplex.registry.models import VersionRecord
    from loraplex.registry.registry import Registry


class FolderAdapterSource:
    """Adapters as sub-folders of one local folder, named by the folder; all are shared.

    The version is ``N@sha-<first 12 hex of the weights' sha256>`` so that replacing a
    folder's weights gives a new version (and a new LoRA id) instead of reusing the old one.
    A folder whose path or files a symlink leads outside the root is not served.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._hashes: dict[tuple[str, int, int], str] = {}

    def resolve(self, model: str, may_use: MayUse = anyone) -> ResolvedAdapter:
        if not may_use(None):
            raise unknown_model(model)
        name = model.split("@", 1)[0].split(":", 1)[0]
        if not NAME_RE.fullmatch(name):
            raise NotFound(f"{model!r} is not a valid adapter name.")
        folder = self._adapter_folder(name)
        if folder is None:
            raise NotFound(f"The model '{model}' does not exist.")
        version = f"{name}@sha-{self._weights_hash(folder / WEIGHTS_FILE)[:12]}"
        if model not in (name, version):
            raise NotFound(f"The model '{model}' does not exist; '{name}' is {version}.")
        return ResolvedAdapter(name=name, version=version, path=folder)

    def names(self, may_use: MayUse = anyone) -> list[str]:
        if not self.root.is_dir() or not may_use(None):
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if NAME_RE.fullmatch(p.name) and self._adapter_folder(p.name) is not None
        )

    def check(self) -> None:
        if not self.root.is_dir():
            raise NotFound(f"Adapters folder {self.root} does not exist.")
        next(self.root.iterdir(), None)

    def _adapter_folder(self, name: str) -> Path | None:
        """``root/name`` if it holds both adapter files and, symlinks followed, they and
        the folder stay inside the root; else None."""
        folder = self.root / name
        files = (folder / WEIGHTS_FILE, folder / CONFIG_FILE)
        if not all(f.is_file() for f in files):
            return None
        root = self.root.resolve()
        if not all(p.resolve().is_relative_to(root) for p in (folder, *files)):
            return None
        return folder

    def _weights_hash(self, weights: Path) -> str:
        stat = weights.stat()
        key = (str(weights), stat.st_mtime_ns, stat.st_size)
        if key not in self._hashes:
            self._hashes[key] = hashlib.sha256(weights.read_bytes()).hexdigest()
        return self._hashes[key]


class RegistryAdapterSource:
    """Adapters served from the registry, by ``N``, ``N:alias`` or ``N@vK``."""

    def __init__(
        self,
        registry: Registry,
        base_fingerprint: str | None = None,
        max_rank: int | None = None,
        *,
        timeout: float = 5.0,
        retry_seconds: float = 1.0,
        stale_seconds: float = 300.0,
        blob_timeout: float = 10.0,
    ) -> None:
        self.registry = registry
        self.base_fingerprint = base_fingerprint
        self.max_rank = max_rank
        self.database = BoundedCaller("The registry database", timeout, retry_seconds)
        self.storage = BoundedCaller("The blob store", blob_timeout, retry_seconds)
        self.known: LastKnownGood[VersionRecord] = LastKnownGood(stale_seconds)

    def resolve(self, model: str, may_use: MayUse = anyone) -> ResolvedAdapter:
        """The version ``model`` names now, with a local folder holding its files."""
        version = self._lookup(model)
        if not may_use(version.tenant):
            raise unknown_model(model)
        if self.base_fingerprint and version.base_fingerprint != self.base_fingerprint:
            raise IncompatibleAdapter(
                f"{version.key} was validated against base model "
                f"{version.base_fingerprint[:12]}, this server runs {self.base_fingerprint[:12]}; "
                "push the adapter to a registry for this base."
            )
        if self.max_rank is not None and version.rank > self.max_rank:
            raise IncompatibleAdapter(
                f"{version.key} has LoRA rank {version.rank}, above this server's maximum "
                f"{self.max_rank} (LORAPLEX_MAX_LORA_RANK)."
            )
        return ResolvedAdapter(
            name=version.name,
            version=version.key,
            path=self.registry.local_folder(version),
            tenant=version.tenant,
            fallback_to_base=version.fallback_to_base,
        )

    def _lookup(self, model: str) -> VersionRecord:
        """The version ``model`` names: from the registry, or its last-known-good answer
        while the registry is down."""
        try:
            version = self.database.call(lambda: self.registry.resolve(model))
        except NotFound:
            self.known.drop(model)
            raise
        except Unavailable as exc:
            known = self.known.get(model)
            if known is None:
                raise Unavailable(
                    f"'{model}' cannot be resolved now: {exc.message} It was not resolved on "
                    f"this server in the last {self.known.max_age:g} s, so it is served again "
                    "once the registry is back; the base model and recently used adapters "
                    "still are.",
                    retry_after=exc.retry_after,
                ) from exc
            return known
        self.known.put(model, version)
        return version

    def names(self, may_use: MayUse = anyone) -> list[str]:
        """Names with a ``stable`` alias (what a bare ``N`` serves) the caller may use."""
        return [
            record.name
            for record in self.database.call(self.registry.catalog.adapters)
            if DEFAULT_ALIAS in record.aliases and may_use(record.tenant)
        ]

    def check(self) -> None:
        """Raise ``Unavailable`` unless the catalog and blob store answer (each in bounded
        time, and at once while known to be down)."""
        errors = []
        for caller, probe in (
            (self.database, self.registry.catalog.check),
            (self.storage, self.registry.blobs.check),
        ):
            try:
                caller.call(probe)
            except Unavailable as exc:
                errors.append(exc.message)
        if errors:
            raise Unavailable(" ".join(errors), retry_after=self.database.retry_seconds)


def registry_source(settings: Settings, base: BaseModelInfo) -> RegistryAdapterSource:
    """Source factory for the server app: the configured registry, checked against ``base``."""
    from loraplex.registry.registry import open_registry

    return RegistryAdapterSource(
        open_registry(settings),
        base.fingerprint,
        settings.max_lora_rank,
        timeout=settings.registry_timeout_seconds,
        retry_seconds=settings.registry_retry_seconds,
        stale_seconds=settings.registry_stale_seconds,
        blob_timeout=settings.blob_timeout_seconds,
    )
