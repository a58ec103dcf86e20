"""Riding out registry and storage faults, as pure logic: single-flight fetches, bounded
calls with outage memory, last-known-good answers, pool exhaustion as 503."""

from __future__ import annotations

import hashlib
import io
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from loraplex.adapter_sources import RegistryAdapterSource
from loraplex.errors import NotFound, Unavailable
from loraplex.registry.basedims import BaseDims
from loraplex.registry.blob_cache import BlobCache
from loraplex.registry.blobs import LocalBlobStore, copy_verified
from loraplex.registry.database import read
from loraplex.registry.outage import BoundedCaller, LastKnownGood
from loraplex.registry.registry import Registry
from loraplex.registry.single_flight import SingleFlight
from loraplex.server.health import REGISTRY_WAIT_SECONDS, registry_state
from loraplex.testing.random_adapters import write_random_adapter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _together(n: int, fn) -> list[object]:  # type: ignore[no-untyped-def]
    """Run ``fn`` on ``n`` threads at once; its results or exceptions, in thread order."""
    out: list[object] = [None] * n
    start = threading.Barrier(n)

    def run(i: int) -> None:
        start.wait()
        try:
            out[i] = fn()
        except Exception as exc:  # noqa: BLE001
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return out


# ---- single flight


def test_single_flight_runs_concurrent_calls_once_and_shares_the_outcome() -> None:
    flight: SingleFlight[int] = SingleFlight()
    calls = []

    def slow() -> int:
        calls.append(1)
        time.sleep(0.3)
        return 42

    assert _together(8, lambda: flight.do("k", slow)) == [42] * 8
    assert len(calls) == 1
    assert flight.do("k", slow) == 42 and len(calls) == 2  # finished: the next call runs again


def test_single_flight_hands_the_error_to_every_waiter() -> None:
    flight: SingleFlight[int] = SingleFlight()

    def broken() -> int:
        time.sleep(0.3)
        raise Unavailable("S3 said 500")

    results = _together(5, lambda: flight.do("k", broken))
    assert all(isinstance(r, Unavailable) and "500" in r.message for r in results)
    assert flight.do("k", lambda: 7) == 7


class CountingStore(LocalBlobStore):
    """A local store whose downloads (the cache links from a local store) are slow and
    counted."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gets: list[str] = []

    def link(self, digest: str, dest: Path) -> None:
        self.gets.append(digest)
        time.sleep(0.3)
        super().link(digest, dest)


def test_concurrent_cold_requests_for_one_version_download_it_once(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "blobs")
    files = {}
    for name, content in (("adapter_config.json", b"{}"), ("weights", b"w" * 1000)):
        digest = hashlib.sha256(content).hexdigest()
        (tmp_path / name).write_bytes(content)
        store.put(digest, tmp_path / name)
        files[name] = digest
    cache = BlobCache(tmp_path / "cache", store, 1 << 20)
    folders = _together(6, lambda: cache.folder("c" * 64, files))
    assert folders == [tmp_path / "cache" / ("c" * 64)] * 6
    assert sorted(store.gets) == sorted(files.values()) and cache.fetches == 1


# ---- bounded calls


def test_a_hung_call_is_unavailable_in_bounded_time_then_fails_fast_until_retry() -> None:
    clock = Clock()
    caller = BoundedCaller("The registry database", 0.2, retry_seconds=1.0, clock=clock)
    release = threading.Event()
    calls = []

    def hang() -> str:
        calls.append(1)
        release.wait(10)
        return "late"

    started = time.monotonic()
    with pytest.raises(Unavailable, match="no answer within 0.2 s"):
        caller.call(hang)
    assert time.monotonic() - started < 5
    assert caller.state()["ok"] is False
    with pytest.raises(Unavailable, match="unreachable"):
        caller.call(lambda: "never called")
    assert len(calls) == 1
    release.set()
    clock.now += 1.5  # retry time: one call probes again, and its answer marks it up
    assert caller.call(lambda: "back") == "back"
    assert caller.state() == {"ok": True}


def test_unavailable_marks_down_and_other_answers_mark_up() -> None:
    clock = Clock()
    caller = BoundedCaller("The registry database", 5, retry_seconds=1.0, clock=clock)

    def refused() -> None:
        raise Unavailable("connection refused")

    with pytest.raises(Unavailable, match="connection refused"):
        caller.call(refused)
    clock.now += 3
    state = caller.state()
    assert state["ok"] is False and state["down_seconds"] == 3.0
    assert "connection refused" in state["error"]

    def unknown() -> None:
        raise NotFound("no such adapter")

    with pytest.raises(NotFound):
        caller.call(unknown)  # the database answered: it is up
    assert caller.state() == {"ok": True}


def test_calls_still_hanging_are_bounded_in_number() -> None:
    caller = BoundedCaller("The registry database", 0.05, retry_seconds=0.0, max_running=2)
    release = threading.Event()
    for _ in range(2):
        with pytest.raises(Unavailable, match="no answer"):
            caller.call(lambda: release.wait(10))
    with pytest.raises(Unavailable, match="2 calls .* still waiting"):
        caller.call(lambda: "not started")
    release.set()


def test_last_known_good_is_served_for_at_most_max_age() -> None:
    clock = Clock()
    known: LastKnownGood[str] = LastKnownGood(10, max_entries=2, clock=clock)
    known.put("sales", "sales@v1")
    clock.now += 10
    assert known.get("sales") == "sales@v1"
    clock.now += 0.1
    assert known.get("sales") is None
    for key in ("a", "b", "c"):
        known.put(key, key)
    assert [known.get(k) for k in ("a", "b", "c")] == [None, "b", "c"]
    known.drop("c")
    assert known.get("c") is None


# ---- the registry source during an outage


def test_an_outage_serves_resolved_adapters_and_refuses_the_rest(
    registry: Registry, tmp_path: Path, tiny_dims: BaseDims, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.push(write_random_adapter(tmp_path / "a", tiny_dims, seed=1), "sales")
    registry.push(write_random_adapter(tmp_path / "b", tiny_dims, seed=2), "support")
    source = RegistryAdapterSource(registry, timeout=1, retry_seconds=60, stale_seconds=300)
    resolved = source.resolve("sales")
    source.check()

    def down(*_: object) -> None:
        raise Unavailable("The registry database cannot be read: connection refused")

    monkeypatch.setattr(registry.catalog, "resolve", down)
    monkeypatch.setattr(registry.catalog, "check", down)
    assert source.resolve("sales") == resolved  # last known good
    with pytest.raises(Unavailable, match="'support' cannot be resolved now") as refused:
        source.resolve("support")
    assert "connection refused" in refused.value.message
    assert refused.value.retry_after == 60
    with pytest.raises(Unavailable, match="registry database is unreachable"):
        source.check()
    assert source.database.state()["ok"] is False


def test_a_promote_is_seen_on_the_next_resolve_while_the_registry_is_up(
    registry: Registry, tmp_path: Path, tiny_dims: BaseDims
) -> None:
    registry.push(write_random_adapter(tmp_path / "a", tiny_dims, seed=1), "sales")
    registry.push(write_random_adapter(tmp_path / "b", tiny_dims, seed=2), "sales")
    source = RegistryAdapterSource(registry)
    assert source.resolve("sales").version == "sales@v1"
    registry.promote("sales@v2")
    assert source.resolve("sales").version == "sales@v2"


def test_pool_exhaustion_is_unavailable_not_a_crash(tmp_path: Path) -> None:
    engine = create_engine(
        f"sqlite:///{tmp_path / 'db'}", pool_size=1, max_overflow=0, pool_timeout=0.1
    )
    with engine.connect(), pytest.raises(Unavailable, match="connection is busy") as busy:
        read(engine, lambda conn: conn.execute(text("SELECT 1")).scalar_one())
    assert busy.value.retry_after == 1
    engine.dispose()


# ---- downloads that go wrong


def test_a_truncated_or_late_download_is_unavailable_and_leaves_nothing(tmp_path: Path) -> None:
    content = b"x" * 5000
    digest = hashlib.sha256(content).hexdigest()
    dest = tmp_path / "out"
    with pytest.raises(Unavailable, match="truncated: 2500 of 5000 bytes"):
        copy_verified(io.BytesIO(content[:2500]), dest, digest, size=5000)
    with pytest.raises(Unavailable, match="still arriving at its deadline"):
        copy_verified(io.BytesIO(content), dest, digest, deadline=time.monotonic() - 1)
    assert list(tmp_path.iterdir()) == []
    copy_verified(io.BytesIO(content), dest, digest, deadline=time.monotonic() + 60, size=5000)
    assert dest.read_bytes() == content


# ---- /ready's report


class SlowSource:
    def __init__(self, error: Exception | None = None, seconds: float = 0.0) -> None:
        self.error, self.seconds = error, seconds

    def check(self) -> None:
        time.sleep(self.seconds)
        if self.error:
            raise self.error


@pytest.mark.anyio
async def test_ready_reports_the_registry_state_without_waiting_on_a_hung_one() -> None:
    assert await registry_state(SlowSource()) == {"ok": True}
    down = Unavailable("The registry database is unreachable (connection refused).")
    assert await registry_state(SlowSource(down)) == {"ok": False, "error": down.message}
    started = time.monotonic()
    hung = await registry_state(SlowSource(seconds=REGISTRY_WAIT_SECONDS + 2))
    assert hung == {"ok": False, "error": f"no answer within {REGISTRY_WAIT_SECONDS:g} s"}
    assert time.monotonic() - started < REGISTRY_WAIT_SECONDS + 1.5
