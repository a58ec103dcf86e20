"""Where the server finds adapters: a plain folder, or the registry (``AdapterSource``).

Both turn the ``model`` a client sent into a ``ResolvedAdapter``: an immutable version key
and a local folder holding ``adapter_config.json`` + ``adapter_model.safetensors``. The
engine gives one LoRA id per version key, so a key must never name other weights. Both
hand the engine only adapters that passed ``loraplex.registry.validate`` (the folder source
checks its own snapshot; the registry checked at push).

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
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from loraplex.adapters import (
    CONFIG_FILE,
    DEFAULT_ALIAS,
    MANIFEST_FILE,
    NAME_RE,
    WEIGHTS_FILE,
    MayUse,
    ResolvedAdapter,
    anyone,
    unknown_model,
)
from loraplex.errors import (
    IncompatibleAdapter,
    InvalidAdapter,
    LoraplexError,
    NotFound,
    TooLarge,
    Unavailable,
)
from loraplex.registry.outage import BoundedCaller, LastKnownGood
from loraplex.registry.validate import BaseSpec, collect_files, validate_adapter

if TYPE_CHECKING:
    from loraplex.basemodel import BaseModelInfo
    from loraplex.config import Settings
    from loraplex.registry.models import VersionRecord
    from loraplex.registry.registry import Registry


class FolderAdapterSource:
    """Adapters as sub-folders of one local folder, named by the folder; all are shared.

    What is served is a snapshot: the adapter's files are copied into ``snapshots/<digest>``
    (the sha256 over the bytes actually copied), checked there as a registry push checks
    them (``loraplex.registry.validate``: safetensors bounds, shapes, finite values, rank,
    modules; pickles refused), and only then handed to the engine. The version is
    ``N@sha-<first 12 hex of that digest>``, so a version key always names the bytes the
    engine reads, and editing a folder mid-load gives a new version or a refusal, never two
    versions under one key. The outcome, a refusal included, is remembered until the
    folder's files change. A folder whose path or files a symlink leads outside the root
    is not served.
    """

    def __init__(self, root: Path, base: BaseSpec, snapshots: Path) -> None:
        self.root = root
        self.base = base
        self.snapshots = snapshots
        self._checked: dict[str, tuple[tuple[object, ...], ResolvedAdapter | LoraplexError]] = {}
        self._locks: dict[str, threading.Lock] = {}

    def resolve(self, model: str, may_use: MayUse = anyone) -> ResolvedAdapter:
        if not may_use(None):
            raise unknown_model(model)
        name = model.split("@", 1)[0].split(":", 1)[0]
        if not NAME_RE.fullmatch(name):
            raise NotFound(f"{model!r} is not a valid adapter name.")
        folder = self._adapter_folder(name)
        if folder is None:
            raise NotFound(f"The model '{model}' does not exist.")
        adapter = self._checked_snapshot(name, folder)
        if model not in (name, adapter.version):
            raise NotFound(f"The model '{model}' does not exist; '{name}' is {adapter.version}.")
        return adapter

    def names(self, may_use: MayUse = anyone) -> list[str]:
        if not self.root.is_dir() or not may_use(None):
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if NAME_RE.fullmatch(p.name)
            and self._adapter_folder(p.name) is not None
            and all((p / f).is_file() for f in (CONFIG_FILE, WEIGHTS_FILE))
        )

    def check(self) -> None:
        if not self.root.is_dir():
            raise NotFound(f"Adapters folder {self.root} does not exist.")
        next(self.root.iterdir(), None)

    def _adapter_folder(self, name: str) -> Path | None:
        """``root/name`` if it is a folder that, symlinks followed, stays inside the root,
        as do the adapter files it has; else None (what it lacks is for the checks to say)."""
        folder = self.root / name
        if not folder.is_dir():
            return None
        root = self.root.resolve()
        files = [folder / f for f in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE)]
        if not all(p.resolve().is_relative_to(root) for p in (folder, *files) if p.exists()):
            return None
        return folder

    def _checked_snapshot(self, name: str, folder: Path) -> ResolvedAdapter:
        """The snapshot of ``folder``, made and checked once per state of its files."""
        with self._locks.setdefault(name, threading.Lock()):
            try:
                files = collect_files(folder)  # pickles next to the weights are refused
            except InvalidAdapter as exc:
                message = exc.message.replace(str(folder), "its folder")
                raise InvalidAdapter(f"Adapter '{name}' is refused: {message}") from None
            stamp = tuple((n, *_stat_key(p)) for n, p in sorted(files.items()))
            cached = self._checked.get(name)
            if cached is None or cached[0] != stamp:
                cached = (stamp, self._snapshot(name, files))
                self._checked[name] = cached
        outcome = cached[1]
        if isinstance(outcome, LoraplexError):
            raise type(outcome)(outcome.message)
        return outcome

    def _snapshot(self, name: str, files: dict[str, Path]) -> ResolvedAdapter | LoraplexError:
        """Copy ``files`` (at most ``max_bytes`` + 1 in all), validate the copy, and keep it
        as ``snapshots/<digest>``; a validation failure is returned, not raised."""
        self.snapshots.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.snapshots))
        try:
            digest = _copy_files(files, staging, self.base.max_bytes + 1)
            validate_adapter(staging, name, self.base)
        except FileNotFoundError:
            shutil.rmtree(staging)
            raise NotFound(f"The model '{name}' does not exist (its files vanished).") from None
        except (InvalidAdapter, IncompatibleAdapter, TooLarge) as exc:
            shutil.rmtree(staging)
            return type(exc)(f"Adapter '{name}' is refused: {exc.message}")
        except BaseException:
            shutil.rmtree(staging)
            raise
        target = self.snapshots / digest
        try:
            staging.rename(target)
        except OSError:  # the same content is already there (another name, or a race)
            shutil.rmtree(staging)
        return ResolvedAdapter(name=name, version=f"{name}@sha-{digest[:12]}", path=target)


def _stat_key(path: Path) -> tuple[int, int, int, int]:
    """What changes when a file's content is replaced or edited."""
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _copy_files(files: dict[str, Path], into: Path, budget: int) -> str:
    """Copy ``files`` into ``into`` (``budget`` bytes at most in all); the sha256 over each
    file's name and the sha256 of the bytes copied."""
    digest = hashlib.sha256()
    for file_name, source in sorted(files.items()):
        file_digest = hashlib.sha256()
        with source.open("rb") as reader, (into / file_name).open("wb") as writer:
            while budget > 0 and (chunk := reader.read(min(1 << 20, budget))):
                file_digest.update(chunk)
                writer.write(chunk)
                budget -= len(chunk)
        digest.update(f"{file_name}\0{file_digest.hexdigest()}\n".encode())
    return digest.hexdigest()


def folder_source(root: Path, settings: Settings, base: BaseModelInfo) -> FolderAdapterSource:
    """Source of the adapters folder ``root``, checked against ``base`` with the server's
    limits; snapshots live under ``<home>/cache/folder-adapters``."""
    return FolderAdapterSource(
        root, BaseSpec.of(base, settings), settings.home / "cache" / "folder-adapters"
    )


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
