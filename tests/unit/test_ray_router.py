"""The Ray router's routing key: the version ``model`` names now in the registry, "" for the
base model and for anything the replica must answer (unknown, malformed, not JSON)."""

from __future__ import annotations

import json
from pathlib import Path

from loraplex.config import Settings
from loraplex.registry.basedims import BaseDims
from loraplex.registry.registry import Registry
from loraplex.server.ray_router import VersionResolver, routing_key
from loraplex.testing.random_adapters import write_random_adapter


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_routing_key_follows_the_registry(
    registry: Registry, tiny_dims: BaseDims, tmp_path: Path
) -> None:
    for seed in (1, 2):
        registry.push(write_random_adapter(tmp_path / f"s{seed}", tiny_dims, seed=seed), "sales")
    url = f"sqlite:///{tmp_path / 'registry-0' / 'reg.db'}"  # the ``registry`` fixture's
    resolver = VersionResolver(Settings(home=tmp_path, registry_url=url, served_model_name="base"))
    key = lambda path, data: routing_key(path, data, resolver)  # noqa: E731
    assert key("/v1/completions", body(model="sales")) == "sales@v1"
    assert key("/v1/chat/completions", body(model="sales@v2")) == "sales@v2"
    assert key("/generate", body(lora_name="sales")) == "sales@v1"
    registry.promote("sales@v2")
    assert key("/v1/completions", body(model="sales")) == "sales@v2"  # no stale cache
    for path, data in [
        ("/v1/completions", body(model="base")),
        ("/v1/completions", body(model="nope")),
        ("/v1/completions", body(model="../etc")),
        ("/v1/completions", body(model=3)),
        ("/v1/completions", b"{not json"),
        ("/v1/completions", b"[1]"),
        ("/v1/models", body(model="sales")),
    ]:
        assert key(path, data) == "", (path, data)


def test_folder_adapters_are_keyed_by_name(tmp_path: Path) -> None:
    resolver = VersionResolver(Settings(home=tmp_path, adapters_dir=tmp_path))
    assert routing_key("/v1/completions", body(model="pirate"), resolver) == "pirate"
