"""Residency bookkeeping (count and byte bounds, pins, leaving with streams in flight) and the
memory of failed loads: pure logic, no engine."""

from __future__ import annotations

import pytest

from loraplex.engine.failed_loads import FailedLoads
from loraplex.engine.residency import MIB, Residency
from loraplex.errors import Conflict, IncompatibleAdapter, TooLarge, Unavailable


def filled(*sizes_mib: int, max_count: int = 8, max_mib: int = 10) -> Residency:
    residency = Residency(max_count, max_mib * MIB, max_pinned=2)
    for i, size in enumerate(sizes_mib):
        residency.add(f"a@v{i}", size * MIB)
    return residency


def test_eviction_is_by_bytes_least_recently_used_first() -> None:
    residency = filled(3, 3, 3)
    residency.touch("a@v0")
    assert residency.victims("new@v1", 2 * MIB) == ["a@v1"]
    assert residency.victims("new@v1", 5 * MIB) == ["a@v1", "a@v2"]
    assert residency.victims("new@v1", 1 * MIB) == []


def test_eviction_is_by_count_too() -> None:
    residency = filled(1, 1, max_count=2)
    assert residency.victims("new@v1", 1) == ["a@v0"]


def test_pinned_in_use_and_leaving_versions_are_never_evicted() -> None:
    residency = filled(3, 3, 3)
    residency.pin("a@v0")
    assert residency.acquire("a@v1")
    residency.leave("a@v2")
    with pytest.raises(Unavailable, match="adapter cache is full") as raised:
        residency.victims("new@v1", 2 * MIB)
    assert raised.value.retry_after
    residency.release("a@v1")
    assert residency.victims("new@v1", 2 * MIB) == ["a@v1"]


def test_an_adapter_larger_than_the_whole_cache_is_too_large() -> None:
    with pytest.raises(TooLarge, match=r"11\.0 MiB.*10\.0 MiB"):
        filled().victims("big@v1", 11 * MIB)


def test_pins_are_bounded() -> None:
    residency = filled(1, 1, 1)
    for version in ("a@v0", "a@v1"):
        residency.check_pin(version)
        residency.pin(version)
    residency.check_pin("a@v0")  # pinning again is fine
    with pytest.raises(Conflict, match="2 adapters are pinned.*MAX_PINNED_ADAPTERS=2"):
        residency.check_pin("a@v2")


def test_a_leaving_version_goes_once_its_last_stream_ends() -> None:
    residency = filled(1)
    assert residency.acquire("a@v0") and residency.acquire("a@v0")
    assert residency.leave("a@v0") == 2
    assert not residency.serving("a@v0") and not residency.acquire("a@v0")
    assert residency.snapshot() == {"a@v0": "unloading"}
    assert residency.release("a@v0") is False
    assert residency.release("a@v0") is True


def test_keep_cancels_a_pending_unload() -> None:
    residency = filled(1)
    residency.acquire("a@v0")
    residency.leave("a@v0")
    residency.keep("a@v0")
    assert residency.serving("a@v0") and residency.release("a@v0") is False


def test_a_failed_load_is_refused_until_it_expires() -> None:
    now = [0.0]
    failed = FailedLoads(ttl=60, clock=lambda: now[0])
    failed.record("bad@v1", IncompatibleAdapter("rank 128 exceeds 64"))
    for _ in range(3):
        with pytest.raises(IncompatibleAdapter, match="rank 128 exceeds 64"):
            failed.check("bad@v1")
    assert failed.report()[0]["engine_attempts"] == 1
    now[0] = 61
    failed.check("bad@v1")  # expired: the engine is asked again
    failed.record("bad@v1", IncompatibleAdapter("rank 128 exceeds 64"))
    assert failed.report()[0]["engine_attempts"] == 2
    failed.forget("bad@v1")
    failed.check("bad@v1")
