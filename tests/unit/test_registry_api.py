"""The registry API on SQLite + local blobs: push, dedupe, aliases, rollback, delete, show."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from loraplex.errors import Conflict, InvalidAdapter, InvalidRequest, NotFound
from loraplex.registry.basedims import BaseDims
from loraplex.registry.blobs import sha256_file
from loraplex.registry.registry import Registry, content_digest
from loraplex.registry.validate import BaseSpec
from loraplex.testing.random_adapters import write_random_adapter


@pytest.fixture
def adapters(tmp_path: Path, tiny_dims: BaseDims) -> list[Path]:
    return [write_random_adapter(tmp_path / f"a{i}", tiny_dims, seed=i) for i in range(4)]


def test_push_versions_and_dedupes(
    registry: Registry, adapters: list[Path], tiny_base: BaseSpec
) -> None:
    first = registry.push(adapters[0], "sales", tenant="acme", actor="ann")
    assert (first.version.key, first.created) == ("sales@v1", True)
    again = registry.push(adapters[0], "sales", actor="bob")
    assert (again.version.key, again.created) == ("sales@v1", False)
    second = registry.push(adapters[1], "sales", description="better")
    assert second.version.key == "sales@v2"
    assert second.version.tenant == "acme"
    files = {
        n: sha256_file(adapters[1] / n)
        for n in ("adapter_config.json", "adapter_model.safetensors")
    }
    assert second.version.sha256 == content_digest(files)
    assert all(registry.blobs.exists(d) for d in files.values())
    assert (second.version.rank, second.version.alpha) == (4, 8.0)
    assert second.version.base_fingerprint == tiny_base.fingerprint
    assert registry.resolve("sales").key == "sales@v1"  # first version is stable, v2 is not


def test_same_content_under_another_name_is_a_new_adapter(
    registry: Registry, adapters: list[Path]
) -> None:
    a = registry.push(adapters[0], "one").version
    b = registry.push(adapters[0], "two").version
    assert (a.key, b.key, a.sha256) == ("one@v1", "two@v1", b.sha256)


def test_resolve_forms(registry: Registry, adapters: list[Path]) -> None:
    for folder in adapters[:3]:
        registry.push(folder, "sales")
    registry.promote("sales@v3", "canary")
    assert registry.resolve("sales").key == "sales@v1"
    assert registry.resolve("sales:stable").key == "sales@v1"
    assert registry.resolve("sales:canary").key == "sales@v3"
    assert registry.resolve("sales@v2").key == "sales@v2"
    for missing, why in [
        ("sales@v9", "no version v9"),
        ("sales:beta", "no alias 'beta'"),
        ("nope", "'nope' does not exist"),
        ("../x", "not a valid"),
    ]:
        with pytest.raises(NotFound, match=why):
            registry.resolve(missing)


def test_promote_and_rollback_chain(registry: Registry, adapters: list[Path]) -> None:
    for folder in adapters[:3]:
        registry.push(folder, "sales")
    assert registry.promote("sales@v2", actor="ann") == ("sales@v1", "sales@v2")
    assert registry.promote("sales@v3", force=True) == ("sales@v2", "sales@v3")
    assert registry.promote("sales@v3") == ("sales@v3", "sales@v3")  # no-op, no event
    assert registry.rollback("sales") == ("sales@v3", "sales@v2")
    assert registry.rollback("sales") == ("sales@v2", "sales@v1")
    with pytest.raises(Conflict, match="no earlier version to roll back to"):
        registry.rollback("sales")
    events = registry.show("sales").events
    assert [(e.action, e.from_number, e.to_number, e.undone) for e in events] == [
        ("auto", None, 1, False),
        ("promote", 1, 2, True),
        ("promote", 2, 3, True),
        ("rollback", 3, 2, False),
        ("rollback", 2, 1, False),
    ]
    assert events[1].by == "ann" and events[2].forced


def test_promote_errors(registry: Registry, adapters: list[Path]) -> None:
    registry.push(adapters[0], "sales")
    with pytest.raises(NotFound, match="sales@v5 does not exist"):
        registry.promote("sales@v5")
    with pytest.raises(NotFound, match="'ghost' does not exist"):
        registry.promote("ghost@v1")
    with pytest.raises(InvalidRequest, match="Invalid alias"):
        registry.promote("sales@v1", "Bad/Alias")
    with pytest.raises(InvalidRequest, match="is an alias"):
        registry.promote("sales:stable")
    with pytest.raises(NotFound, match="has no alias 'canary'"):
        registry.rollback("sales", "canary")


def test_delete_refused_while_aliased_and_numbers_never_reused(
    registry: Registry, adapters: list[Path]
) -> None:
    registry.push(adapters[0], "sales")
    registry.push(adapters[1], "sales")
    registry.promote("sales@v2", "canary")
    with pytest.raises(Conflict, match="sales@v2 is what alias canary points at"):
        registry.delete("sales@v2")
    registry.promote("sales@v1", "canary")
    assert registry.delete("sales@v2").key == "sales@v2"
    with pytest.raises(NotFound):
        registry.resolve("sales@v2")
    with pytest.raises(NotFound, match="does not exist"):
        registry.delete("sales@v2")
    assert registry.push(adapters[1], "sales").version.key == "sales@v3"


def test_rollback_to_a_deleted_version_is_refused(registry: Registry, adapters: list[Path]) -> None:
    for folder in adapters[:3]:
        registry.push(folder, "sales")
    registry.promote("sales@v2")
    registry.promote("sales@v3")
    registry.delete("sales@v2")
    with pytest.raises(Conflict, match="sales@v2, which was deleted"):
        registry.rollback("sales")


def test_tenant_owns_the_name(registry: Registry, adapters: list[Path]) -> None:
    registry.push(adapters[0], "sales", tenant="acme")
    with pytest.raises(Conflict, match="belongs to tenant 'acme'"):
        registry.push(adapters[1], "sales", tenant="globex")
    with pytest.raises(InvalidAdapter, match="Invalid adapter name"):
        registry.push(adapters[1], "other", tenant="../root")


def test_show_list_and_evals(registry: Registry, adapters: list[Path]) -> None:
    registry.push(adapters[0], "sales", tenant="acme", description="first", actor="ann")
    registry.push(adapters[1], "sales")
    registry.push(adapters[2], "support")
    registry.record_eval("sales@v2", "smoke", True, {"accuracy": 0.9}, actor="ci")
    shown = registry.show("sales")
    assert [v.key for v in shown.versions] == ["sales@v1", "sales@v2"]
    assert shown.aliases == {"stable": 1}
    assert shown.versions[0].created_by == "ann" and shown.versions[0].description == "first"
    assert [(e.number, e.suite, e.passed, e.metrics) for e in shown.evals] == [
        (2, "smoke", True, {"accuracy": 0.9})
    ]
    data = shown.to_dict()
    assert data["aliases"] == {"stable": "sales@v1"} and data["evals"][0]["created_by"] == "ci"
    assert [a.name for a in registry.list()] == ["sales", "support"]
    assert registry.catalog.names() == ["sales", "support"]
    with pytest.raises(NotFound):
        registry.show("ghost")
    registry.promote("sales@v1", "canary")
    with pytest.raises(Conflict):
        registry.delete("sales@v1")
    registry.promote("sales@v2")
    registry.promote("sales@v2", "canary")
    registry.delete("sales@v1")
    assert registry.show("sales").evals[0].number == 2


def test_local_folder_has_the_pushed_files(registry: Registry, adapters: list[Path]) -> None:
    version = registry.push(adapters[0], "sales").version
    folder = registry.local_folder(version)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (folder / name).read_bytes() == (adapters[0] / name).read_bytes()
    assert registry.local_folder(version) == folder


def test_list_works_without_a_base_model(
    tmp_path: Path, make_registry: Callable[[Callable[[], BaseSpec]], Registry]
) -> None:
    def no_base() -> BaseSpec:
        raise NotFound("not prepared")

    reg = make_registry(no_base)
    assert reg.list() == []
    with pytest.raises(NotFound, match="not prepared"):
        reg.push(tmp_path, "x")
    reg.check()
