"""``RegistryAdapterSource``: what the server gets from the registry (SQLite, local blobs)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from loraplex.adapter_sources import RegistryAdapterSource
from loraplex.adapters import AdapterSource
from loraplex.errors import IncompatibleAdapter, NotFound
from loraplex.registry.basedims import BaseDims
from loraplex.registry.registry import Registry
from loraplex.registry.validate import BaseSpec
from loraplex.testing.random_adapters import write_random_adapter


@pytest.fixture
def tiny_base(tiny_base: BaseSpec) -> BaseSpec:
    """The shared tiny base, with room for the rank-12 adapter these tests push."""
    return replace(tiny_base, max_rank=16)


def test_resolves_to_a_local_folder_per_version(
    registry: Registry, tmp_path: Path, tiny_dims: BaseDims, tiny_base: BaseSpec
) -> None:
    registry.push(write_random_adapter(tmp_path / "a", tiny_dims, seed=1), "sales", tenant="acme")
    registry.push(write_random_adapter(tmp_path / "b", tiny_dims, seed=2), "sales")
    registry.promote("sales@v2", "canary")
    source: AdapterSource = RegistryAdapterSource(registry, tiny_base.fingerprint, max_rank=16)
    stable, canary = source.resolve("sales"), source.resolve("sales:canary")
    assert (stable.version, canary.version) == ("sales@v1", "sales@v2")
    assert (stable.name, stable.tenant, stable.fallback_to_base) == ("sales", "acme", False)
    assert stable.path != canary.path
    assert json.loads((stable.path / "adapter_config.json").read_text())["r"] == 4
    assert source.names() == ["sales"]
    source.check()
    registry.promote("sales@v2")
    assert source.resolve("sales").version == "sales@v2"  # seen on the next call
    with pytest.raises(NotFound):
        source.resolve("sales:beta")


def test_refuses_a_version_of_another_base(
    registry: Registry, tmp_path: Path, tiny_dims: BaseDims
) -> None:
    registry.push(write_random_adapter(tmp_path / "a", tiny_dims), "sales")
    source = RegistryAdapterSource(registry, "cd" * 32)
    with pytest.raises(IncompatibleAdapter, match="validated against base model abababababab"):
        source.resolve("sales")


def test_refuses_a_rank_above_this_servers_max(
    registry: Registry, tmp_path: Path, tiny_dims: BaseDims, tiny_base: BaseSpec
) -> None:
    folder = write_random_adapter(tmp_path / "a", tiny_dims, rank=4)
    config = json.loads((folder / "adapter_config.json").read_text())
    # rank_pattern raises q_proj's rank to 12: the recorded rank is the largest one
    config["rank_pattern"] = {"q_proj": 12}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    write_random_adapter(tmp_path / "q", tiny_dims, rank=12, targets=("q_proj",))
    _merge_q_proj(folder, tmp_path / "q")
    assert registry.push(folder, "sales").version.rank == 12
    with pytest.raises(IncompatibleAdapter, match="rank 12, above this server's maximum 8"):
        RegistryAdapterSource(registry, tiny_base.fingerprint, max_rank=8).resolve("sales")


def _merge_q_proj(target: Path, donor: Path) -> None:
    """Replace ``target``'s q_proj tensors by ``donor``'s (a higher rank)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(target / "adapter_model.safetensors")
    tensors.update(load_file(donor / "adapter_model.safetensors"))
    save_file(tensors, target / "adapter_model.safetensors")


def test_fallback_policy_is_set_by_push(
    registry: Registry, tmp_path: Path, tiny_dims: BaseDims
) -> None:
    folder = write_random_adapter(tmp_path / "a", tiny_dims)
    registry.push(folder, "sales")
    source = RegistryAdapterSource(registry)
    assert source.resolve("sales").fallback_to_base is False
    registry.push(folder, "sales", fallback_to_base=True)  # identical content: policy only
    assert source.resolve("sales").fallback_to_base is True
    registry.push(write_random_adapter(tmp_path / "b", tiny_dims, seed=5), "sales")
    assert source.resolve("sales@v2").fallback_to_base is True  # kept when not given


def test_marks_versions_pushed_for_this_base_within_its_limits_as_checked(
    registry: Registry, tmp_path: Path, tiny_dims: BaseDims, tiny_base: BaseSpec
) -> None:
    registry.push(write_random_adapter(tmp_path / "a", tiny_dims, rank=4), "sales")
    resolve = lambda spec: RegistryAdapterSource(registry, spec=spec).resolve("sales")  # noqa: E731
    assert resolve(tiny_base).checked_for == tiny_base  # the engine does not validate again
    assert resolve(None).checked_for is None
    for other in (
        replace(tiny_base, max_rank=2),
        replace(tiny_base, max_bytes=10),
        replace(tiny_base, fingerprint="cd" * 32),
    ):
        assert resolve(other).checked_for is None  # the engine's own check decides


def test_a_name_resolved_under_the_current_generation_is_held_without_a_query(
    registry: Registry,
    tmp_path: Path,
    tiny_dims: BaseDims,
    tiny_base: BaseSpec,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry.push(write_random_adapter(tmp_path / "a", tiny_dims, seed=1), "sales", tenant="acme")
    registry.push(write_random_adapter(tmp_path / "b", tiny_dims, seed=2), "sales")
    source = RegistryAdapterSource(registry, tiny_base.fingerprint, 16, refresh_seconds=60)
    try:
        source.refresh()  # the generation read, as the watcher does
        assert source.resolve_held("sales") is None  # never resolved here
        resolved = source.resolve("sales")
        asked: list[str] = []
        monkeypatch.setattr(registry, "resolve", lambda model: asked.append(model))
        assert source.resolve_held("sales") == resolved
        assert asked == []  # from memory and a look at the blob cache
        with pytest.raises(NotFound, match="does not exist"):
            source.resolve_held("sales", may_use=lambda tenant: tenant != "acme")
        shutil.rmtree(resolved.path)  # evicted from the blob cache: resolve fetches it
        assert source.resolve_held("sales") is None
        monkeypatch.undo()
        assert source.resolve("sales") == resolved
        assert source.resolve_held("sales") == resolved
        registry.promote("sales@v2")
        source.refresh()  # the generation moved: names are looked up again
        assert source.resolve_held("sales") is None
        assert source.resolve("sales").version == "sales@v2"
    finally:
        source.close()
