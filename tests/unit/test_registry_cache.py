"""Local blob store and the LRU disk cache: content addressing, verification, eviction."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import blake3
import pytest

from loraplex.errors import InvalidAdapter, NotFound, Unavailable
from loraplex.registry import blob_cache, blobs
from loraplex.registry.blob_cache import BlobCache
from loraplex.registry.blobs import LocalBlobStore, blob_key, open_blob_store


def _blob(store: LocalBlobStore, tmp_path: Path, content: bytes) -> str:
    digest = hashlib.sha256(content).hexdigest()
    source = tmp_path / f"src-{digest[:8]}"
    source.write_bytes(content)
    store.put(digest, source)
    return digest


def test_local_store_is_content_addressed(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    digest = _blob(store, tmp_path, b"hello")
    assert (tmp_path / "blobs" / "sha256" / digest[:2] / digest).read_bytes() == b"hello"
    assert store.exists(digest)
    store.put(digest, tmp_path / f"src-{digest[:8]}")  # idempotent
    store.delete(digest)
    assert not store.exists(digest)
    with pytest.raises(NotFound, match="missing"):
        store.get(digest, tmp_path / "out")


def test_put_refuses_content_that_does_not_match_its_key(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    source = tmp_path / "f"
    source.write_bytes(b"actual")
    with pytest.raises(Unavailable, match="arrived with sha256"):
        store.put(hashlib.sha256(b"claimed").hexdigest(), source)
    assert not any(p.is_file() for p in (tmp_path / "blobs").rglob("*"))


@pytest.mark.parametrize("digest", ["../../etc/passwd", "AB" * 32, "a" * 63, ""])
def test_blob_keys_are_only_hex_digests(digest: str) -> None:
    with pytest.raises(InvalidAdapter, match="not a sha256 hex digest"):
        blob_key(digest)


def test_open_blob_store_from_path_and_file_url(tmp_path: Path) -> None:
    assert isinstance(open_blob_store(str(tmp_path / "a")), LocalBlobStore)
    assert open_blob_store(f"file://{tmp_path / 'b'}").root == tmp_path / "b"


def test_cache_fetches_verifies_and_reuses(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    files = {
        "adapter_config.json": _blob(store, tmp_path, b"{}"),
        "adapter_model.safetensors": _blob(store, tmp_path, b"w" * 100),
    }
    cache = BlobCache(tmp_path / "cache", store, 10_000)
    folder = cache.folder("c" * 64, files)
    assert (folder / "adapter_model.safetensors").read_bytes() == b"w" * 100
    store.delete(files["adapter_model.safetensors"])
    assert cache.folder("c" * 64, files) == folder  # served from cache, store not needed
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_a_local_stores_blobs_are_linked_into_the_cache_not_copied(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    digest = _blob(store, tmp_path, b"w" * 100)
    folder = BlobCache(tmp_path / "cache", store, 10_000).folder("c" * 64, {"w": digest})
    stored = tmp_path / "blobs" / blob_key(digest)
    assert (folder / "w").stat().st_ino == stored.stat().st_ino


def test_where_linking_fails_the_cache_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    digest = _blob(store, tmp_path, b"w" * 100)

    def cross_device(source: Path, dest: Path) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    folder = BlobCache(tmp_path / "cache", store, 10_000).folder("c" * 64, {"w": digest})
    assert (folder / "w").read_bytes() == b"w" * 100
    assert (folder / "w").stat().st_ino != (tmp_path / "blobs" / blob_key(digest)).stat().st_ino


def test_a_blob_missing_from_the_store_is_unavailable_not_unknown(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    cache = BlobCache(tmp_path / "cache", store, 10_000)
    with pytest.raises(Unavailable, match="blob store is incomplete"):
        cache.folder("f" * 64, {"adapter_model.safetensors": "0" * 64})


def test_cache_refuses_a_corrupt_blob(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    digest = _blob(store, tmp_path, b"good weights")
    (tmp_path / "blobs" / blob_key(digest)).write_bytes(b"evil weights")
    cache = BlobCache(tmp_path / "cache", store, 10_000)
    with pytest.raises(Unavailable, match="arrived with sha256"):
        cache.folder("d" * 64, {"adapter_model.safetensors": digest})
    assert list((tmp_path / "cache").iterdir()) == []


def _stored_blob(tmp_path: Path) -> tuple[LocalBlobStore, str, Path]:
    """A store holding one 100-byte blob: the store, the blob's digest, its BLAKE3 file."""
    store = LocalBlobStore(tmp_path / "blobs")
    digest = _blob(store, tmp_path, b"w" * 100)
    return store, digest, (tmp_path / "blobs" / blob_key(digest)).with_name(f"{digest}.blake3")


def test_a_link_is_checked_against_the_blobs_blake3_not_its_sha256(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, digest, fast = _stored_blob(tmp_path)
    assert fast.read_text() == blake3.blake3(b"w" * 100).hexdigest()  # written by put
    assert dict(store.stored()).keys() == {digest}  # not a blob itself

    def no_sha256(path: Path) -> str:
        raise AssertionError("the sha256 was read")

    monkeypatch.setattr(blobs, "sha256_file", no_sha256)
    store.link(digest, tmp_path / "linked")
    assert (tmp_path / "linked").read_bytes() == b"w" * 100
    store.delete(digest)
    assert not fast.exists()


def test_put_writes_the_blake3_from_the_copy_without_reading_the_blob_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_second_read(path: Path) -> str:
        raise AssertionError("the stored blob was read again for its BLAKE3")

    monkeypatch.setattr(blobs, "blake3_file", no_second_read)
    _store, _digest, fast = _stored_blob(tmp_path)
    assert fast.read_text() == blake3.blake3(b"w" * 100).hexdigest()


def test_a_large_blob_is_checked_on_every_core_with_the_same_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = os.urandom(blobs.PARALLEL_BLAKE3_BYTES + 12345)
    store = LocalBlobStore(tmp_path / "blobs")
    digest = _blob(store, tmp_path, content)
    threads: list[int] = []
    real = blake3.blake3

    def counting(*args: object, max_threads: int = 1) -> blake3.blake3:
        threads.append(max_threads)
        return real(*args, max_threads=max_threads)

    counting.AUTO = real.AUTO  # type: ignore[attr-defined]
    monkeypatch.setattr(blobs.blake3, "blake3", counting)
    store.link(digest, tmp_path / "linked")  # against the BLAKE3 put computed as it copied
    assert threads == [real.AUTO]
    stored = tmp_path / "blobs" / blob_key(digest)
    assert blobs.blake3_file(stored) == real(content).hexdigest()
    small = tmp_path / "small"
    small.write_bytes(content[:1000])
    assert blobs.blake3_file(small) == real(content[:1000]).hexdigest()
    assert threads[-1] == 1
    damaged = bytearray(content)
    damaged[len(content) // 2] ^= 1  # one bit, in a chunk another thread hashes
    stored.write_bytes(bytes(damaged))
    with pytest.raises(Unavailable, match="the stored blob is corrupt"):
        store.link(digest, tmp_path / "linked-again")


@pytest.mark.parametrize("damage", [b"x" * 100, b"w" * 99, b"w" * 101])
def test_a_corrupt_or_truncated_blob_with_a_blake3_file_is_refused(
    tmp_path: Path, damage: bytes
) -> None:
    store, digest, _ = _stored_blob(tmp_path)
    (tmp_path / "blobs" / blob_key(digest)).write_bytes(damage)
    with pytest.raises(Unavailable, match="the stored blob is corrupt"):
        store.link(digest, tmp_path / "linked")
    assert not (tmp_path / "linked").exists()


@pytest.mark.parametrize("recorded", [None, "0" * 64, "\udcff"])
def test_a_missing_or_wrong_blake3_file_falls_back_to_the_sha256_and_is_rewritten(
    tmp_path: Path, recorded: str | None
) -> None:
    store, digest, fast = _stored_blob(tmp_path)
    if recorded is None:
        fast.unlink()  # a blob stored before the BLAKE3 files were kept
    else:
        fast.write_bytes(recorded.encode(errors="surrogateescape"))
    store.link(digest, tmp_path / "linked")
    assert (tmp_path / "linked").read_bytes() == b"w" * 100
    assert fast.read_text() == blake3.blake3(b"w" * 100).hexdigest()


def test_a_store_this_process_cannot_write_still_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, digest, fast = _stored_blob(tmp_path)
    fast.unlink()

    def read_only(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(blobs.os, "replace", read_only)
    store.link(digest, tmp_path / "linked")
    assert (tmp_path / "linked").read_bytes() == b"w" * 100
    assert not fast.exists()
    assert [p.name for p in fast.parent.iterdir()] == [digest]  # no temporary file left


def test_cache_evicts_least_recently_used(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    cache = BlobCache(tmp_path / "cache", store, 250)
    keys = []
    for i in range(3):
        key = f"{i}" * 64
        keys.append(key)
        cache.folder(key, {"adapter_model.safetensors": _blob(store, tmp_path, bytes([i]) * 100)})
        os.utime(tmp_path / "cache" / key, (1000 + i, 1000 + i))
    # three 100-byte entries exceed 250: the oldest (0) went when the third arrived
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == keys[1:]
    os.utime(tmp_path / "cache" / keys[1], (5000, 5000))  # 1 is now the most recent
    cache.folder("9" * 64, {"adapter_model.safetensors": _blob(store, tmp_path, b"z" * 100)})
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([keys[1], "9" * 64])
    assert cache.size() == 200


def test_fetches_under_the_bound_do_not_scan_the_cache_until_the_scan_is_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    cache = BlobCache(tmp_path / "cache", store, 1000)
    scans = []
    evict = cache.evict
    monkeypatch.setattr(cache, "evict", lambda keep=None: scans.append(keep) or evict(keep))
    for i in range(5):
        cache.folder(f"{i}" * 64, {"w": _blob(store, tmp_path, bytes([i]) * 100)})
    assert len(scans) == 1  # the first fetch: the total was unknown
    # another process filled the cache meanwhile; this one counts it at its next scan
    other = tmp_path / "cache" / ("a" * 64)
    other.mkdir()
    (other / "w").write_bytes(b"o" * 600)
    os.utime(other, (1, 1))  # the least recently used
    now = blob_cache.time.monotonic()
    monkeypatch.setattr(blob_cache.time, "monotonic", lambda: now + blob_cache.RESCAN_SECONDS)
    cache.folder("5" * 64, {"w": _blob(store, tmp_path, b"5" * 100)})
    assert len(scans) == 2 and not other.exists()
    assert cache.size() == 600


def test_an_entry_larger_than_the_cache_is_still_served(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    cache = BlobCache(tmp_path / "cache", store, 10)
    folder = cache.folder("e" * 64, {"w": _blob(store, tmp_path, b"x" * 100)})
    assert (folder / "w").is_file()


def test_a_versions_files_are_fetched_in_parallel(tmp_path: Path) -> None:
    """A remote store's round trips overlap: each get waits until the other has started."""
    store = LocalBlobStore(tmp_path / "blobs")
    files = {
        "adapter_config.json": _blob(store, tmp_path, b"{}"),
        "adapter_model.safetensors": _blob(store, tmp_path, b"w" * 100),
    }
    both_started = threading.Barrier(2, timeout=60)

    class RemoteStore:  # only ``get``, as the S3 store: no local file to link
        url = "remote"

        def get(self, digest: str, dest: Path) -> None:
            both_started.wait()  # BrokenBarrierError if the gets ran one after the other
            store.get(digest, dest)

    cache = BlobCache(tmp_path / "cache", RemoteStore(), 10_000)  # type: ignore[arg-type]
    folder = cache.folder("e" * 64, files)
    assert (folder / "adapter_config.json").read_bytes() == b"{}"
    assert (folder / "adapter_model.safetensors").read_bytes() == b"w" * 100


def test_a_local_stores_files_are_linked_in_the_callers_thread(tmp_path: Path) -> None:
    """No round trips to overlap: a thread per file would only add to a cold load."""
    linked_in = []

    class LinkingStore(LocalBlobStore):
        def link(self, digest: str, dest: Path) -> None:
            linked_in.append(threading.current_thread())
            super().link(digest, dest)

    store = LinkingStore(tmp_path / "blobs")
    names = ("adapter_config.json", "adapter_model.safetensors")
    files = {name: _blob(store, tmp_path, name.encode()) for name in names}
    folder = BlobCache(tmp_path / "cache", store, 10_000).folder("e" * 64, files)
    assert linked_in == [threading.current_thread()] * 2
    source = store._path(files["adapter_model.safetensors"])
    assert (folder / "adapter_model.safetensors").stat().st_ino == source.stat().st_ino
