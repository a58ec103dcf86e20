"""Fixtures shared by the unit tests."""

# ---- registry: a tiny fake base model, and registries on SQLite + local blobs under tmp_path

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loraplex.registry.basedims import BaseDims
from loraplex.registry.blob_cache import BlobCache
from loraplex.registry.blobs import LocalBlobStore
from loraplex.registry.catalog import Catalog
from loraplex.registry.registry import Registry
from loraplex.registry.validate import BaseSpec


@pytest.fixture
def tiny_dims() -> BaseDims:
    """A tiny Llama-shaped base: hidden 64, MLP 96, 4 heads (2 KV) of 16, 2 layers."""
    return BaseDims(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=2,
    )


@pytest.fixture
def tiny_base(tiny_dims: BaseDims) -> BaseSpec:
    """What adapters must fit: ``tiny_dims``, fingerprint ``abab...``, rank <= 8, 1 MiB."""
    return BaseSpec("ab" * 32, tiny_dims, name="tiny", max_rank=8, max_bytes=1 << 20)


@pytest.fixture
def make_registry(tmp_path: Path) -> Iterator[Callable[[Callable[[], BaseSpec]], Registry]]:
    """Builds registries in their own folders under ``tmp_path`` (closed at teardown)."""
    made: list[Registry] = []

    def make(base: Callable[[], BaseSpec]) -> Registry:
        root = tmp_path / f"registry-{len(made)}"
        blobs = LocalBlobStore(root / "blobs")
        catalog = Catalog(f"sqlite:///{root / 'reg.db'}")
        made.append(Registry(catalog, blobs, BlobCache(root / "cache", blobs, 10 << 20), base))
        return made[-1]

    yield make
    for registry in made:
        registry.close()


@pytest.fixture
def registry(
    make_registry: Callable[[Callable[[], BaseSpec]], Registry], tiny_base: BaseSpec
) -> Registry:
    """A registry that validates against ``tiny_base``."""
    return make_registry(lambda: tiny_base)
