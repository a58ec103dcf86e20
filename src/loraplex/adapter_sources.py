"""Where the server finds adapters: a plain folder, or the registry (``AdapterSource``).

Both turn the ``model`` a client sent into a ``ResolvedAdapter``: an immutable version key
and a local folder holding ``adapter_config.json`` + ``adapter_model.safetensors``. The
engine gives one LoRA id per version key, so a key must never name other weights. Both
hand the engine only adapters that passed ``loraplex.registry.validate`` (the folder source
checks its own snapshot; the registry checked at push).

The registry source keeps what it resolved in memory while the registry's generation counter
(bumped by every push, promote, rollback, delete and preload intent) is unchanged; a watcher
thread reads that one number every ``refresh_seconds`` and names are trusted only while its
last read began under ``2 * refresh_seconds`` ago, so a promote or rollback is served by every
server within that bound, with one cheap query per interval instead of one per request
(``refresh_seconds=0``: look up on every ``resolve``). A request keeps the version it
resolved until it ends. A version recorded against another base model, or above
this server's rank limit, is refused (409) before it reaches the engine. Each lookup is
bounded in time; while the registry is down, what this server resolved in the last
``stale_seconds`` is served from memory and anything else is a 503 at once (``outage.py``).
``resolve`` does blocking I/O (files, database, maybe a download): call it from a worker
thread in async code. ``resolve_held`` answers without one where nothing needs waiting for (a
name resolved under the current generation whose files are in the blob cache), so requests
for versions already here never queue for worker threads that slow downloads hold.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from loraplex.adapters import (
    CONFIG_FILE,
    DEFAULT_ALIAS,
    MANIFEST_FILE,
    NAME_RE,
    WEIGHTS_FILE,
    MayUse,
    ModelCard,
    ResolvedAdapter,
    anyone,
    trained_format,
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

    def resolve_held(self, model: str, may_use: MayUse = anyone) -> ResolvedAdapter | None:
        return None  # ``resolve`` reads the folder to see whether its files changed

    def names(self, may_use: MayUse = anyone) -> list[str]:
        return [card.id for card in self.models(may_use)]

    def models(self, may_use: MayUse = anyone) -> list[ModelCard]:
        """Shared adapters, created when their weights file was last written."""
        if not self.root.is_dir() or not may_use(None):
            return []
        return sorted(
            (
                ModelCard(p.name, None, int((p / WEIGHTS_FILE).stat().st_mtime))
                for p in self.root.iterdir()
                if NAME_RE.fullmatch(p.name)
                and self._adapter_folder(p.name) is not None
                and all((p / f).is_file() for f in (CONFIG_FILE, WEIGHTS_FILE))
            ),
            key=lambda card: card.id,
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
        manifest = target / MANIFEST_FILE
        return ResolvedAdapter(
            name=name,
            version=f"{name}@sha-{digest[:12]}",
            path=target,
            prompt_format=trained_format(
                json.loads(manifest.read_text()) if manifest.is_file() else None
            ),
            checked_for=self.base,
        )


def _unix(when: datetime) -> int:
    """Unix seconds of a stored time (stored in UTC; SQLite gives it back naive)."""
    return int(when.replace(tzinfo=when.tzinfo or UTC).timestamp())


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
        refresh_seconds: float = 0.0,
        spec: BaseSpec | None = None,
    ) -> None:
        self.registry = registry
        self.spec = spec
        self.base_fingerprint = base_fingerprint
        self.max_rank = max_rank
        self.database = BoundedCaller("The registry database", timeout, retry_seconds)
        self.storage = BoundedCaller("The blob store", blob_timeout, retry_seconds)
        self.known: LastKnownGood[VersionRecord] = LastKnownGood(stale_seconds)
        self.refresh_seconds = refresh_seconds
        self.generation: int | None = None  # as last read by the watcher
        self._lock = threading.Lock()
        self._fresh: dict[str, VersionRecord] = {}
        self._confirmed_at = float("-inf")  # when the last generation read began
        self._stopped = threading.Event()
        self._watcher: threading.Thread | None = None
        self._changed: list[threading.Event] = []

    def watch(self) -> threading.Event:
        """Start following the generation counter (once); the event returned is set whenever
        it changes (the caller clears it)."""
        changed = threading.Event()
        with self._lock:
            self._changed.append(changed)
        self._start()
        return changed

    def _start(self) -> None:
        with self._lock:
            if self._watcher is None and self.refresh_seconds > 0:
                self._watcher = threading.Thread(
                    target=self._follow, name="registry generation", daemon=True
                )
                self._watcher.start()

    def close(self) -> None:
        """Stop the watcher thread."""
        self._stopped.set()

    def _follow(self) -> None:
        while not self._stopped.is_set():
            self.refresh()
            self._stopped.wait(self.refresh_seconds)

    def refresh(self) -> None:
        """Read the generation counter once; forget resolved names if it moved."""
        began = time.monotonic()
        try:
            generation = self.database.call(self.registry.catalog.generation)
        except Unavailable:
            return  # names are no longer trusted once the last good read ages out
        with self._lock:
            moved = generation != self.generation
            if moved:
                self._fresh.clear()
                self.generation = generation
            self._confirmed_at = began
            listeners = list(self._changed) if moved else []
        for event in listeners:
            event.set()

    def _trusted(self) -> bool:
        age = time.monotonic() - self._confirmed_at
        return self.refresh_seconds > 0 and age < 2 * self.refresh_seconds

    def resolve(self, model: str, may_use: MayUse = anyone) -> ResolvedAdapter:
        """The version ``model`` names now, with a local folder holding its files."""
        version = self._lookup(model)
        self._admit(model, version, may_use)
        held = self.registry.held_folder(version)
        if held is not None:
            return self._resolved(version, held, 0.0)
        started = time.perf_counter()
        path = self.registry.local_folder(version)
        return self._resolved(version, path, time.perf_counter() - started)

    def resolve_held(self, model: str, may_use: MayUse = anyone) -> ResolvedAdapter | None:
        """``resolve`` from memory and the blob cache only: the version ``model`` named when
        last resolved, while the generation read since says it still does, if its files
        are here; else None."""
        with self._lock:
            version = self._fresh.get(model) if self._trusted() else None
        if version is None:
            return None
        self._admit(model, version, may_use)
        path = self.registry.held_folder(version)
        return None if path is None else self._resolved(version, path, 0.0)

    def _admit(self, model: str, version: VersionRecord, may_use: MayUse) -> None:
        """Refuse ``version`` to a caller who may not use it (as unknown), or one this
        server cannot load."""
        if not may_use(version.tenant):
            raise unknown_model(model)
        if not version.fallback_to_base:  # else the engine's load check refuses it: fallback
            self._check_fits(version)

    def _resolved(
        self, version: VersionRecord, path: Path, fetch_seconds: float
    ) -> ResolvedAdapter:
        return ResolvedAdapter(
            name=version.name,
            version=version.key,
            path=path,
            fetch_seconds=fetch_seconds,
            tenant=version.tenant,
            fallback_to_base=version.fallback_to_base,
            prompt_format=trained_format(version.manifest),
            checked_for=self._checked_for(version),
        )

    def _checked_for(self, version: VersionRecord) -> BaseSpec | None:
        """``spec`` if the push's validation holds for it: the version's files (content-checked
        on arrival in the blob cache) passed ``validate_adapter`` at push against a base with
        this fingerprint, and its rank and size are within this server's limits."""
        spec = self.spec
        fits = (
            spec is not None
            and version.base_fingerprint == spec.fingerprint
            and version.rank <= spec.max_rank
            and version.size <= spec.max_bytes
        )
        return spec if fits else None

    def _check_fits(self, version: VersionRecord) -> None:
        """Refuse (409) a version made for another base or above this server's rank."""
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

    def _lookup(self, model: str) -> VersionRecord:
        """The version ``model`` names: from memory while the generation is fresh, else from
        the registry, or its last-known-good answer while the registry is down."""
        if self._watcher is None:
            self._start()
        with self._lock:
            generation = self.generation
            fresh = self._fresh.get(model) if self._trusted() else None
        if fresh is not None:
            return fresh
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
        with self._lock:
            if generation is not None and generation == self.generation:
                self._fresh[model] = version
        return version

    def names(self, may_use: MayUse = anyone) -> list[str]:
        """Names with a ``stable`` alias (what a bare ``N`` serves) the caller may use."""
        return [card.id for card in self.models(may_use)]

    def models(self, may_use: MayUse = anyone) -> list[ModelCard]:
        """The same names with their tenant and when the name was first pushed."""
        return [
            ModelCard(record.name, record.tenant, _unix(record.created_at))
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
        refresh_seconds=settings.alias_refresh_seconds,
        spec=BaseSpec.of(base, settings),
    )
