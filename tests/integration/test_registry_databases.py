"""The registry catalog on real databases: SQLite file and PostgreSQL, one process and two.

PostgreSQL comes from ``LORAPLEX_TEST_POSTGRES_URL`` (CI starts it with
``scripts/start_postgres.sh``); each test gets a fresh database (``loraplex.testing.postgres``).
Without the variable the PostgreSQL cases skip locally and FAIL under ``CI=true``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraplex.adapters import parse_ref
from loraplex.errors import Conflict, NotFound
from loraplex.registry.basedims import BaseDims
from loraplex.registry.blob_cache import BlobCache
from loraplex.registry.blobs import LocalBlobStore
from loraplex.registry.catalog import Catalog
from loraplex.registry.registry import Registry
from loraplex.registry.validate import BaseSpec
from loraplex.testing.postgres import fresh_database
from loraplex.testing.random_adapters import write_random_adapter

pytestmark = pytest.mark.integration
DIMS = BaseDims(64, 96, 4, 2, 16, 2)
SPEC = BaseSpec("ab" * 32, DIMS, name="tiny", max_rank=8, max_bytes=1 << 20)
PER_WORKER = 8


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    with fresh_database() as url:
        yield url


def _registry(db_url: str, tmp_path: Path) -> Registry:
    blobs = LocalBlobStore(tmp_path / "blobs")
    return Registry(
        Catalog(db_url), blobs, BlobCache(tmp_path / "cache", blobs, 1 << 24), lambda: SPEC
    )


def test_full_flow(db_url: str, tmp_path: Path) -> None:
    registry = _registry(db_url, tmp_path)
    folders = [write_random_adapter(tmp_path / f"a{i}", DIMS, seed=i) for i in range(3)]
    assert registry.push(folders[0], "sales", tenant="acme").version.key == "sales@v1"
    assert not registry.push(folders[0], "sales").created
    registry.push(folders[1], "sales")
    registry.push(folders[2], "sales")
    registry.promote("sales@v3", "canary")
    registry.promote("sales@v2")
    assert [registry.resolve(m).key for m in ("sales", "sales:canary", "sales@v1")] == [
        "sales@v2",
        "sales@v3",
        "sales@v1",
    ]
    assert registry.rollback("sales") == ("sales@v2", "sales@v1")
    with pytest.raises(Conflict, match="points at"):
        registry.delete("sales@v3")
    registry.delete("sales@v2")
    with pytest.raises(NotFound):
        registry.resolve("sales@v2")
    registry.record_eval("sales@v3", "smoke", False, {"loss": 1.5})
    gate = {"reference": "base", "data_sha256": "cd" * 32, "base_fingerprint": "ab" * 32}
    registry.record_eval("sales@v3", "gate", True, {"decided_by": "token_f1"}, **gate)
    shown = registry.show("sales")
    assert [v.number for v in shown.versions] == [1, 3] and shown.evals[0].passed is False
    verdict = shown.evals[1]
    assert (verdict.reference, verdict.data_sha256, verdict.base_fingerprint) == tuple(
        gate.values()
    )
    assert registry.local_folder(shown.versions[1]).is_dir()
    registry.check()
    # a second Catalog on the same database (as another process would) sees the same state
    other = Catalog(db_url)
    assert other.resolve(parse_ref("sales")).key == "sales@v1"
    other.close()
    registry.close()


WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from loraplex.registry.basedims import BaseDims
    from loraplex.registry.blobs import LocalBlobStore
    from loraplex.registry.blob_cache import BlobCache
    from loraplex.registry.catalog import Catalog
    from loraplex.registry.registry import Registry
    from loraplex.registry.validate import BaseSpec

    db_url, root, who, go = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    spec = BaseSpec("ab" * 32, BaseDims(64, 96, 4, 2, 16, 2), max_rank=8, max_bytes=1 << 20)
    blobs = LocalBlobStore(root / "blobs")
    reg = Registry(Catalog(db_url), blobs, BlobCache(root / f"cache-{who}", blobs, 1 << 24),
                   lambda: spec)
    while not go.exists():
        time.sleep(0.01)
    pushed = {}
    for folder in sorted((root / who).iterdir()) + [root / "shared"]:
        result = reg.push(folder, "race", actor=who)
        pushed[folder.name] = [result.version.key, result.version.sha256, result.created]
        reg.promote(result.version.key, "stable", actor=who)
        reg.promote(result.version.key, "canary", actor=who)
        if folder.name.endswith("3"):
            reg.rollback("race", "canary", actor=who)
    print(json.dumps(pushed))
    """
)


def _chain_is_consistent(events: list, alias: str, final: int) -> None:
    """Each move of ``alias`` starts where the previous one ended; the last is current."""
    moves = [e for e in events if e.alias == alias]
    for before, after in zip(moves, moves[1:], strict=False):
        assert after.from_number == before.to_number, (before, after)
    assert moves[-1].to_number == final


def test_a_schema_2_database_gets_the_gate_columns(db_url: str, tmp_path: Path) -> None:
    Catalog(db_url).close()
    catalog = Catalog(db_url)  # as a schema-2 database: the gate columns dropped, then upgraded
    with catalog.engine.begin() as conn:
        for column in ("reference", "data_sha256", "base_fingerprint"):
            conn.exec_driver_sql(f"ALTER TABLE eval_results DROP COLUMN {column}")
    catalog.close()
    registry = _registry(db_url, tmp_path)
    registry.push(write_random_adapter(tmp_path / "a", DIMS), "sales")
    registry.record_eval("sales@v1", "gate", False, {}, reference="base", data_sha256="ef" * 32)
    assert registry.show("sales").evals[0].data_sha256 == "ef" * 32


def test_two_processes_push_and_promote_the_same_name(db_url: str, tmp_path: Path) -> None:
    Catalog(db_url).close()  # schema exists before the race (creation races are retried too)
    for who in ("w0", "w1"):
        for i in range(PER_WORKER):
            write_random_adapter(tmp_path / who / f"a{i}", DIMS, seed=1000 * int(who[1]) + i)
    write_random_adapter(tmp_path / "shared", DIMS, seed=999)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, db_url, str(tmp_path), who, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for who in ("w0", "w1")
    ]
    time.sleep(1.0)  # both interpreters are importing; the go file releases them together
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        results.append(json.loads(out))

    registry = _registry(db_url, tmp_path)
    shown = registry.show("race")
    numbers = [v.number for v in shown.versions]
    assert numbers == list(range(1, 2 * PER_WORKER + 2)), "a version was lost or duplicated"
    by_key = {v.key: v.sha256 for v in shown.versions}
    own = [r[f"a{i}"] for r in results for i in range(PER_WORKER)]
    assert len({key for key, _, _ in own}) == 2 * PER_WORKER
    assert all(by_key[key] == sha for key, sha, created in own if created)
    shared = [r["shared"] for r in results]
    assert shared[0][0] == shared[1][0] and sorted(c for _, _, c in shared) == [False, True]
    assert set(shown.aliases) == {"stable", "canary"}
    for alias, number in shown.aliases.items():
        assert number in numbers
        _chain_is_consistent(shown.events, alias, number)
    promotes = [e for e in shown.events if e.action == "promote"]
    assert {e.by for e in promotes} == {"w0", "w1"}
    registry.close()
