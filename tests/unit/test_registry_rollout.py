"""Rollout through the registry (SQLite, local blobs): the generation counter that lets a
server keep resolved names, preload intents and their acks, and ``gc`` racing pushes."""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest

from loraplex.adapter_sources import RegistryAdapterSource
from loraplex.registry.basedims import BaseDims
from loraplex.registry.registry import Registry
from loraplex.registry.validate import BaseSpec
from loraplex.testing.random_adapters import write_random_adapter
from loraplex.testing.rollout_load import AliasTimeline, Answer


def push(registry: Registry, tmp_path: Path, dims: BaseDims, seed: int, name: str = "sales"):  # type: ignore[no-untyped-def]
    return registry.push(write_random_adapter(tmp_path / f"s{seed}", dims, seed=seed), name)


def test_every_write_moves_the_generation(
    registry: Registry, tmp_path: Path, tiny_dims: BaseDims
) -> None:
    seen = [registry.catalog.generation()]
    push(registry, tmp_path, tiny_dims, 1)
    push(registry, tmp_path, tiny_dims, 2)
    for step in (
        lambda: registry.promote("sales@v2"),
        lambda: registry.rollback("sales"),
        lambda: registry.delete("sales@v2"),
        lambda: registry.rollout.request_preload("sales", 1, "me"),
    ):
        before = registry.catalog.generation()
        step()
        seen.append(registry.catalog.generation())
        assert seen[-1] != before
    assert len(set(seen)) == len(seen)


def test_a_server_resolves_from_memory_until_the_generation_moves(
    registry: Registry,
    tmp_path: Path,
    tiny_dims: BaseDims,
    tiny_base: BaseSpec,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    push(registry, tmp_path, tiny_dims, 1)
    push(registry, tmp_path, tiny_dims, 2)
    lookups: list[str] = []
    resolve = registry.resolve
    monkeypatch.setattr(registry, "resolve", lambda m: lookups.append(m) or resolve(m))
    # a long interval: the watcher reads once, then this test calls refresh() itself
    source = RegistryAdapterSource(registry, tiny_base.fingerprint, refresh_seconds=60)
    changed = source.watch()
    source.refresh()
    try:
        assert [source.resolve("sales").version for _ in range(5)] == ["sales@v1"] * 5
        assert lookups == ["sales"]  # one query, then memory
        changed.clear()
        registry.promote("sales@v2")
        assert source.resolve("sales").version == "sales@v1"  # until the counter is read
        source.refresh()
        assert changed.is_set()
        assert source.resolve("sales").version == "sales@v2"
        assert lookups == ["sales", "sales"]
    finally:
        source.close()


def test_names_are_not_trusted_once_the_last_check_is_old(
    registry: Registry, tmp_path: Path, tiny_dims: BaseDims, tiny_base: BaseSpec
) -> None:
    push(registry, tmp_path, tiny_dims, 1)
    push(registry, tmp_path, tiny_dims, 2)
    source = RegistryAdapterSource(registry, tiny_base.fingerprint, refresh_seconds=60)
    source.watch()
    source.refresh()
    try:
        assert source.resolve("sales").version == "sales@v1"
        registry.promote("sales@v2")
        source._confirmed_at -= 120  # the watcher stalled (e.g. the database hangs)
        assert source.resolve("sales").version == "sales@v2"
    finally:
        source.close()


def test_preload_waits_for_live_servers_and_names_the_silent_one(
    registry: Registry, tmp_path: Path, tiny_dims: BaseDims
) -> None:
    push(registry, tmp_path, tiny_dims, 1)
    rollout = registry.rollout
    since = datetime.now(UTC) - timedelta(seconds=1)
    for server in ("warm", "broken", "silent"):
        rollout.heartbeat(server, f"host-{server}")
    stop = threading.Event()

    def answer() -> None:  # what the two answering servers' preloaders do
        while not stop.is_set():
            for server, error in (("warm", None), ("broken", "no room")):
                for preload in rollout.pending(server, since):
                    assert (preload.name, preload.number) == ("sales", 1)
                    rollout.ack(preload.id, server, error)
            time.sleep(0.01)

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        outcome = registry.preload("sales@v1", timeout=1.0, live_within=60)
    finally:
        stop.set()
        thread.join()
    assert outcome.acks == {"warm": None, "broken": "no room"}
    assert outcome.failed == {"broken": "no room"}
    assert outcome.missing == ["silent (host-silent)"]
    rollout.leave("silent")
    assert set(rollout.live_servers(60)) == {"warm", "broken"}
    assert rollout.pending("warm", since) == []


def _age(registry: Registry, digests: set[str], seconds: float) -> None:
    for digest in digests:
        path = registry.blobs.root / "sha256" / digest[:2] / digest  # type: ignore[attr-defined]
        stamp = time.time() - seconds
        os.utime(path, (stamp, stamp))


def test_gc_removes_only_unreferenced_old_blobs(
    registry: Registry, tmp_path: Path, tiny_dims: BaseDims
) -> None:
    v1 = push(registry, tmp_path, tiny_dims, 1).version
    v2 = push(registry, tmp_path, tiny_dims, 2).version
    registry.promote("sales@v2")
    registry.delete("sales@v1")
    orphans = set(v1.files.values()) - set(v2.files.values())
    assert orphans and set(v1.files.values()) & set(v2.files.values())  # the config is shared
    young = registry.gc(grace_seconds=3600)
    assert (young.orphans, set(young.kept_young)) == ({}, orphans)
    _age(registry, orphans | set(v2.files.values()), 7200)
    dry = registry.gc(grace_seconds=3600)
    assert set(dry.orphans) == orphans and dry.deleted == []
    assert all(registry.blobs.exists(d) for d in orphans)
    done = registry.gc(grace_seconds=3600, delete=True)
    assert set(done.deleted) == orphans
    assert not any(registry.blobs.exists(d) for d in orphans)
    assert all(registry.blobs.exists(d) for d in v2.files.values())
    assert registry.gc(grace_seconds=0).orphans == {}


def test_a_push_reusing_an_orphaned_blob_survives_gc(
    registry: Registry, tmp_path: Path, tiny_dims: BaseDims, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = push(registry, tmp_path, tiny_dims, 1).version
    push(registry, tmp_path, tiny_dims, 2)
    registry.promote("sales@v2")
    registry.delete("sales@v1")
    _age(registry, set(v1.files.values()), 7200)
    # gc runs between the push's puts and its record: its delete is undone by the push
    add_version = registry.catalog.add_version

    def gc_then_add(*args, **kwargs):  # type: ignore[no-untyped-def]
        registry.gc(grace_seconds=0, delete=True)
        return add_version(*args, **kwargs)

    monkeypatch.setattr(registry.catalog, "add_version", gc_then_add)
    again = push(registry, tmp_path, tiny_dims, 1, name="other").version
    assert all(registry.blobs.exists(d) for d in again.files.values())
    # and with the default grace, the re-put blob is young again: nothing is collected
    monkeypatch.undo()
    assert registry.gc(grace_seconds=60).orphans == {}


def test_gc_racing_live_pushes_never_breaks_a_version(
    registry: Registry, tmp_path: Path, tiny_dims: BaseDims
) -> None:
    versions = []
    errors: list[BaseException] = []

    def pushes() -> None:
        try:
            for seed in range(10, 22):
                versions.append(push(registry, tmp_path, tiny_dims, seed, name=f"n{seed}").version)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=pushes)
    thread.start()
    while thread.is_alive():
        registry.gc(grace_seconds=5, delete=True)
    thread.join()
    assert not errors
    assert len(versions) == 12
    assert all(registry.blobs.exists(d) for v in versions for d in v.files.values())


def test_the_timeline_accepts_a_version_only_while_it_may_have_been_the_target() -> None:
    timeline = AliasTimeline()
    timeline.start("a", "a@v1")
    timeline.moved("a", 10.0, 10.2, "a@v2")  # committed somewhere in [10.0, 10.2]
    timeline.moved("a", 20.0, 20.1, "a@v1")
    answer = partial(Answer, "a", status=200)
    ok = [
        answer(sent=5, answered=6, version="a@v1"),
        answer(sent=10.1, answered=11, version="a@v1"),  # the move may not have landed yet
        answer(sent=10.9, answered=11, version="a@v1"),  # stale, within the 1 s slack
        answer(sent=12, answered=13, version="a@v2"),
        answer(sent=19, answered=25, version="a@v2"),
        answer(sent=25, answered=26, version="a@v1"),
    ]
    late = answer(sent=11.5, answered=12, version="a@v1")
    wrong = answer(sent=5, answered=6, version="a@v2")
    assert timeline.explain([*ok, late, wrong], slack=1.0) == [late, wrong]
