"""Content-addressed blob stores: a local folder, or an S3-compatible bucket (``s3.py``).

A blob is a file stored under its own sha256 (``sha256/ab/abcd...``), written once and never
changed, so the same content pushed twice (or under two names) is stored once. Putting a blob
that is already there refreshes its time stamp, so ``adapters gc`` (which keeps young blobs)
never removes one a push is about to reference. ``put`` and ``get`` hash while copying and
refuse content that does not match its key (``copy_verified``), so a fetched blob is read
once. This module does not know what an adapter is; the catalog records which blobs make up
a version.

The local store hard-links a blob into the blob cache instead of copying it, so reading the
blob to check it is all the fetch costs, and sha256 (~1.3 GB/s here: 15 ms for a 20 MB
adapter) made that most of a cold load's registry side. So it also keeps, beside each blob,
the blob's BLAKE3 digest (``<digest>.blake3``, ~6 GB/s on one core), written once the blob's
sha256 was checked; a link is checked against that. Any mismatch, or a missing or unreadable
digest file, falls back to the sha256, which stays the authority: a corrupt or truncated blob
is still refused. What the BLAKE3 file does not add is protection from someone who can write
the store's folder (they could replace both files); the registry's SQLite file beside it is
theirs to edit anyway.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO, Protocol

import blake3

from loraplex.errors import InvalidAdapter, NotFound, Unavailable

_CHUNK = 1 << 20


class BlobStore(Protocol):
    """Where adapter files live, keyed by their sha256 hex digest."""

    url: str

    def put(self, digest: str, source: Path) -> None:
        """Store ``source`` under ``digest`` unless already there (idempotent)."""
        ...

    def get(self, digest: str, dest: Path) -> None:
        """Write the blob to ``dest``, its sha256 checked on the way (``Unavailable`` if it is
        not ``digest``: the caller need not read it again); ``NotFound`` if it is missing."""
        ...

    def exists(self, digest: str) -> bool:
        """Whether the blob is stored."""
        ...

    def delete(self, digest: str) -> None:
        """Remove the blob if present."""
        ...

    def stored(self) -> Iterator[tuple[str, float]]:
        """Every blob as ``(digest, stored_at)``: when it was last put (Unix time)."""
        ...

    def stored_at(self, digest: str) -> float | None:
        """When the blob was last put (Unix time), or None if it is missing."""
        ...

    def check(self) -> None:
        """Raise ``Unavailable`` if the store cannot be reached."""
        ...


def is_digest(text: str) -> bool:
    """Whether ``text`` is a lowercase sha256 hex digest."""
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def blob_key(digest: str) -> str:
    """The relative key of a blob: ``sha256/ab/<digest>``."""
    if not is_digest(digest):
        raise InvalidAdapter(f"{digest!r} is not a sha256 hex digest.")
    return f"sha256/{digest[:2]}/{digest}"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


#: From this size on, a file's BLAKE3 is computed on every core (BLAKE3 hashes a tree of
#: chunks, so the digest is the same): on 2 cores, 8 MiB took 1.8 ms on one and 0.8 ms on
#: both; below ~4 MiB starting the threads costs more than they save.
PARALLEL_BLAKE3_BYTES = 4 << 20


def blake3_file(path: Path) -> str:
    """Hex BLAKE3 of a file (memory-mapped; on every core from ``PARALLEL_BLAKE3_BYTES``)."""
    large = path.stat().st_size >= PARALLEL_BLAKE3_BYTES
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO if large else 1)
    return hasher.update_mmap(path).hexdigest()


def copy_verified(
    source: BinaryIO,
    dest: Path,
    digest: str,
    deadline: float | None = None,
    size: int | None = None,
    *,
    with_blake3: bool = False,
) -> str | None:
    """Copy a stream to ``dest`` atomically; ``Unavailable`` if it ends before ``size``
    bytes, its sha256 is not ``digest``, or the copy is still running at ``deadline`` (a
    ``time.monotonic()`` value). With ``with_blake3``, returns the copy's BLAKE3, computed
    in the same pass."""
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    hasher = hashlib.sha256()
    fast = blake3.blake3() if with_blake3 else None
    received = 0
    try:
        with tmp.open("wb") as out:
            while chunk := source.read(_CHUNK):
                if deadline is not None and time.monotonic() > deadline:
                    raise Unavailable(
                        f"Blob {digest[:12]} was still arriving at its deadline: the blob "
                        "store is too slow; retry later."
                    )
                hasher.update(chunk)
                if fast is not None:
                    fast.update(chunk)
                out.write(chunk)
                received += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        if size is not None and received != size:
            raise Unavailable(
                f"Blob {digest[:12]} arrived truncated: {received} of {size} bytes; retry later."
            )
        if hasher.hexdigest() != digest:
            raise Unavailable(
                f"Content for blob {digest[:12]} arrived with sha256 {hasher.hexdigest()[:12]}: "
                "the source changed while copied or the stored blob is corrupt."
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return None if fast is None else fast.hexdigest()


class LocalBlobStore:
    """Blobs as files under one local folder (the default, under LORAPLEX_HOME)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)

    def _path(self, digest: str) -> Path:
        return self.root / blob_key(digest)

    def put(self, digest: str, source: Path) -> None:
        path = self._path(digest)
        if path.is_file():
            os.utime(path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with source.open("rb") as handle:
            fast = copy_verified(handle, path, digest, with_blake3=True)
        self._record_fast_digest(path, fast)

    def get(self, digest: str, dest: Path) -> None:
        path = self._path(digest)
        if not path.is_file():
            raise NotFound(f"Blob {digest[:12]} is missing from {self.root}.")
        with path.open("rb") as handle:
            copy_verified(handle, dest, digest)

    def link(self, digest: str, dest: Path) -> None:
        """Like ``get``, but ``dest`` is a hard link to the stored file where the file system
        allows it: no copy and no fsync (the stored file is durable since its ``put``), only
        a read to check it against its BLAKE3 file, or its sha256 where that does not match.
        For read-only users such as the blob cache; elsewhere a copy."""
        path = self._path(digest)
        try:
            os.link(path, dest)
        except FileNotFoundError as exc:
            raise NotFound(f"Blob {digest[:12]} is missing from {self.root}.") from exc
        except OSError:  # another file system, or linking not permitted: copy
            self.get(digest, dest)
            return
        recorded = self._fast_digest(path)
        if recorded is not None and recorded == blake3_file(dest):
            return
        actual = sha256_file(dest)
        if actual != digest:
            dest.unlink()
            raise Unavailable(
                f"Content for blob {digest[:12]} arrived with sha256 {actual[:12]}: "
                "the stored blob is corrupt."
            )
        self._record_fast_digest(path)  # missing (stored before it was kept) or damaged

    @staticmethod
    def _fast_digest_path(path: Path) -> Path:
        return path.with_name(f"{path.name}.blake3")

    def _fast_digest(self, path: Path) -> str | None:
        """The BLAKE3 recorded for the blob at ``path``, or None if there is none to read."""
        try:
            return self._fast_digest_path(path).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None

    def _record_fast_digest(self, path: Path, fast: str | None = None) -> None:
        """Write the BLAKE3 of the blob at ``path`` (``fast``, or read from the file), whose
        sha256 was just checked; a store this process may not write keeps working without it
        (every link reads the sha256)."""
        target = self._fast_digest_path(path)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_text(fast or blake3_file(path))
            os.replace(tmp, target)
        except OSError:
            tmp.unlink(missing_ok=True)

    def exists(self, digest: str) -> bool:
        return self._path(digest).is_file()

    def delete(self, digest: str) -> None:
        path = self._path(digest)
        path.unlink(missing_ok=True)
        self._fast_digest_path(path).unlink(missing_ok=True)

    def stored(self) -> Iterator[tuple[str, float]]:
        for path in sorted((self.root / "sha256").glob("??/*")):
            if is_digest(path.name) and path.parent.name == path.name[:2]:
                with suppress(FileNotFoundError):
                    yield path.name, path.stat().st_mtime

    def stored_at(self, digest: str) -> float | None:
        try:
            return self._path(digest).stat().st_mtime
        except FileNotFoundError:
            return None

    def check(self) -> None:
        if not os.access(self.root if self.root.exists() else self.root.parent, os.R_OK):
            raise Unavailable(f"Blob folder {self.root} cannot be read.")


def open_blob_store(
    url: str,
    *,
    s3_endpoint_url: str | None = None,
    timeout: float = 10.0,
    fetch_timeout: float = 120.0,
) -> BlobStore:
    """A store from a URL: ``s3://bucket/prefix``, ``file:///path`` or a plain path.
    ``timeout`` bounds an S3 connect or read; ``fetch_timeout`` one whole download."""
    if url.startswith("s3://"):
        from loraplex.registry.s3 import S3BlobStore

        return S3BlobStore.from_url(
            url, endpoint_url=s3_endpoint_url, timeout=timeout, fetch_timeout=fetch_timeout
        )
    path = Path(url.removeprefix("file://")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return LocalBlobStore(path)
