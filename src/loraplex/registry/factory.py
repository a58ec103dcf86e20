"""Building a ``Registry`` (and its parts) from ``Settings``.

Defaults put everything under LORAPLEX_HOME: ``registry/registry.db`` (SQLite),
``registry/blobs`` and ``cache/adapters``. The base model is read lazily, on first push, so
commands that do not validate (list, promote...) work before ``loraplex model prepare``.
"""

from __future__ import annotations

from loraplex.config import Settings
from loraplex.errors import NotFound
from loraplex.registry.basedims import BaseDims
from loraplex.registry.blobs import open_blob_store
from loraplex.registry.cache import BlobCache
from loraplex.registry.catalog import Catalog
from loraplex.registry.registry import Registry
from loraplex.registry.validate import BaseSpec


def registry_url(settings: Settings) -> str:
    """The catalog URL in effect."""
    return settings.registry_url or f"sqlite:///{settings.home / 'registry' / 'registry.db'}"


def blob_url(settings: Settings) -> str:
    """The blob store URL in effect."""
    return settings.blob_url or str(settings.home / "registry" / "blobs")


def base_spec(settings: Settings) -> BaseSpec:
    """The base model adapters must fit, with the server's rank and size limits."""
    from loraplex.basemodel import bundled_model_dir, describe

    base_dir = settings.base_model or bundled_model_dir(settings.models_dir)
    if not (base_dir / "config.json").is_file():
        raise NotFound(
            f"The base model {base_dir} is not prepared; run `loraplex model prepare` first."
        )
    info = describe(base_dir)
    return BaseSpec(
        fingerprint=info.fingerprint,
        dims=BaseDims.from_model_dir(info.path),
        name=info.name,
        max_rank=settings.max_lora_rank,
        max_bytes=settings.max_adapter_mb * 2**20,
    )


def open_registry(settings: Settings | None = None) -> Registry:
    """The registry configured by ``settings`` (default: from the environment)."""
    settings = settings or Settings()
    blobs = open_blob_store(blob_url(settings), s3_endpoint_url=settings.s3_endpoint_url)
    cache = BlobCache(
        settings.home / "cache" / "adapters", blobs, int(settings.blob_cache_gib * 2**30)
    )
    return Registry(Catalog(registry_url(settings)), blobs, cache, lambda: base_spec(settings))
