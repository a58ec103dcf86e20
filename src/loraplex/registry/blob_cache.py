"""A bounded local disk cache of adapter folders, filled from a blob store on first use.

Each entry is a folder named by the version's content digest holding the version's files
under their PEFT names, so the engine can load it as it is. A version's files are fetched in
parallel from a remote store (their round trips overlap) and hard-linked in turn from a local
one (a thread per file cost ~0.25 ms of each cold load), checked on arrival (sha256; from a
local store the BLAKE3 kept beside the blob, see ``blobs``), and the folder appears
atomically (rename), so a half-fetched entry is never seen.
Past ``max_bytes`` the least recently used entries are removed (use touches the folder).
The folder is scanned for that only when this process's running total says the bound may be
passed, or when its last scan is ``RESCAN_SECONDS`` old (other processes fill it too): a scan
stats every entry, which a cold load should not pay for in a cache of thousands.
Entries are immutable: a digest always names the same files. Safe for several processes;
within one, concurrent requests for a missing entry fetch it once (``SingleFlight``), and
``fetches`` counts the downloads started.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from loraplex.errors import NotFound, Unavailable
from loraplex.registry.blobs import BlobStore
from loraplex.registry.single_flight import SingleFlight

#: A process rescans the cache at least this often, to count what other processes added.
RESCAN_SECONDS = 60.0


class BlobCache:
    """Local folders of adapter versions, LRU-bounded by total size."""

    def __init__(self, root: Path, store: BlobStore, max_bytes: int) -> None:
        self.root = root
        self.store = store
        self.max_bytes = max_bytes
        self.fetches = 0
        self._count_lock = threading.Lock()
        self._flight: SingleFlight[Path] = SingleFlight()
        self._total: int | None = None
        """Bytes held, as of the last scan plus what this process fetched since."""
        self._scanned_at = 0.0
        # Kept for the process: starting threads per fetch cost ~1 ms of each cold load.
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="blob-fetch")
        # A local store hard-links its blobs (no round trips); a remote one only copies them.
        self._link = getattr(store, "link", None)

    def held(self, content_digest: str, files: dict[str, str]) -> Path | None:
        """The local folder if it is complete here (touched: it was used), else None; never
        fetches. A few ``stat`` calls."""
        target = self.root / content_digest
        if not _complete(target, files):
            return None
        try:
            os.utime(target)
        except FileNotFoundError:  # evicted just now
            return None
        return target

    def folder(self, content_digest: str, files: dict[str, str]) -> Path:
        """The local folder with ``files`` (PEFT file name -> blob sha256), fetched if needed."""
        held = self.held(content_digest, files)
        if held is not None:
            return held
        target = self.root / content_digest
        return self._flight.do(content_digest, lambda: self._fetch(target, files))

    def _fetch(self, target: Path, files: dict[str, str]) -> Path:
        if _complete(target, files):  # a concurrent flight just finished it
            return target
        with self._count_lock:
            self.fetches += 1
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".fetch-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            if self._link is not None:
                for file_name, digest in files.items():
                    self._fetch_file(digest, staging / file_name)
            else:
                fetched = [
                    self._pool.submit(self._fetch_file, digest, staging / file_name)
                    for file_name, digest in files.items()
                ]
                wait(fetched)  # all of them, before a failure removes the staging folder
                for future in fetched:
                    future.result()
            try:
                os.rename(staging, target)
            except OSError:
                if not _complete(target, files):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        try:
            added: int | None = _entry_bytes(target)
        except FileNotFoundError:  # evicted at once by another process
            added = None
        with self._count_lock:
            self._total = None if self._total is None or added is None else self._total + added
        if self._may_be_over():
            self.evict(keep=target)
        return target

    def _may_be_over(self) -> bool:
        """Whether an eviction scan is due: the running total passed the bound, or is
        unknown or stale."""
        with self._count_lock:
            fresh = time.monotonic() - self._scanned_at < RESCAN_SECONDS
            return self._total is None or not fresh or self._total > self.max_bytes

    def _fetch_file(self, digest: str, dest: Path) -> None:
        """One blob into ``dest`` (the store checks its sha256 as it writes it); from a local
        store a hard link, not a copy (cold-load latency)."""
        try:
            (self._link or self.store.get)(digest, dest)
        except NotFound as exc:
            raise Unavailable(
                f"{exc.message} The registry lists it, so the blob store is incomplete; "
                "push the adapter again to restore it."
            ) from exc

    def evict(self, keep: Path | None = None) -> list[str]:
        """Remove least recently used entries until the cache fits; returns removed digests."""
        entries = []
        for entry in self.root.iterdir() if self.root.is_dir() else []:
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                entries.append((entry.stat().st_mtime, _entry_bytes(entry), entry))
            except FileNotFoundError:
                continue
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, entry in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if keep is not None and entry == keep:
                continue
            trash = self.root / f".evict-{uuid.uuid4().hex}"
            try:
                os.rename(entry, trash)
            except OSError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
            total -= size
            removed.append(entry.name)
        with self._count_lock:
            self._total, self._scanned_at = total, time.monotonic()
        return removed

    def size(self) -> int:
        """Bytes held by complete entries."""
        return sum(
            f.stat().st_size
            for entry in (self.root.iterdir() if self.root.is_dir() else [])
            if entry.is_dir() and not entry.name.startswith(".")
            for f in entry.iterdir()
        )


def _entry_bytes(entry: Path) -> int:
    return sum(f.stat().st_size for f in entry.iterdir())


def _complete(folder: Path, files: dict[str, str]) -> bool:
    return all((folder / name).is_file() for name in files)
