"""``ray_cpus``: replicas of one node get disjoint runs of cores; a replacement takes the slot
of a replica whose process is gone; with no whole slot left, a replica binds nothing. Ray's
key-value store is replaced by a dict (the claim logic is what is tested here; the real store
runs in tests/integration/test_ray_serve.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loraplex.server import ray_cpus


@pytest.fixture
def kv(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    store: dict[str, bytes] = {}

    def put(key: str, value: str, overwrite: bool = True, namespace: str = "") -> bool:
        existed = key in store
        if overwrite or not existed:
            store[key] = value.encode()
        return existed

    def get(key: str, namespace: str = "") -> bytes | None:
        return store.get(key)

    monkeypatch.setattr(ray_cpus.internal_kv, "_internal_kv_put", put)
    monkeypatch.setattr(ray_cpus.internal_kv, "_internal_kv_get", get)
    return store


def dead_pid() -> int:
    """The pid of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_slots_are_disjoint_whole_runs() -> None:
    assert ray_cpus.slots([3, 1, 0, 2], 1) == [[0], [1], [2], [3]]
    assert ray_cpus.slots([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3]]
    assert ray_cpus.slots([0, 1], 4) == []


def test_each_replica_claims_its_own_slot(kv: dict[str, bytes]) -> None:
    me, parent = os.getpid(), os.getppid()
    assert ray_cpus.claim("node", 2, me) == 0
    assert ray_cpus.claim("node", 2, me) == 0  # asking again keeps it
    assert ray_cpus.claim("node", 2, parent) == 1
    assert ray_cpus.claim("other-node", 2, parent) == 0
    assert ray_cpus.claim("node", 2, 1) is None  # both slots held by live processes


def test_a_replacement_takes_a_dead_replicas_slot(kv: dict[str, bytes]) -> None:
    assert ray_cpus.claim("node", 2, os.getpid()) == 0
    assert ray_cpus.claim("node", 2, dead_pid()) == 1
    assert ray_cpus.claim("node", 2, os.getppid()) == 1
    assert kv[f"{ray_cpus.KV_PREFIX}node/1"] == str(os.getppid()).encode()
