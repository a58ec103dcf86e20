"""Blobs in an S3-compatible bucket: a real ``moto_server`` process over HTTP on 127.0.0.1,
reached through the same boto3 code as production (``LORAPLEX_BLOB_URL=s3://...`` and
``LORAPLEX_S3_ENDPOINT_URL``)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
from safetensors.numpy import save_file

from loraplex.adapter_sources import RegistryAdapterSource
from loraplex.config import Settings
from loraplex.errors import Unavailable
from loraplex.registry.basedims import BaseDims
from loraplex.registry.blobs import blob_key
from loraplex.registry.registry import base_spec, open_registry, registry_url
from loraplex.registry.s3 import S3BlobStore
from loraplex.testing.random_adapters import write_random_adapter

pytestmark = pytest.mark.integration
DIMS = BaseDims(64, 96, 4, 2, 16, 2)
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"loraplex-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def settings(
    tmp_path: Path, s3_endpoint: str, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """Settings from the environment, as a deployment would set them."""
    base = tmp_path / "base"
    base.mkdir()
    config = {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_hidden_layers": 2,
    }
    (base / "config.json").write_text(json.dumps(config))
    save_file({"w": np.zeros(4, np.float32)}, base / "model.safetensors")
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORAPLEX_BASE_MODEL", str(base))
    monkeypatch.setenv("LORAPLEX_BLOB_URL", f"s3://{bucket}/team/adapters")
    monkeypatch.setenv("LORAPLEX_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.delenv("LORAPLEX_REGISTRY_URL", raising=False)
    return Settings()


def _elsewhere(settings: Settings, home: Path) -> Settings:
    """Another machine: its own home (so its own cache), the same catalog and bucket."""
    return settings.model_copy(update={"home": home, "registry_url": registry_url(settings)})


def _objects(endpoint: str, bucket: str) -> list[str]:
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_push_stores_blobs_in_the_bucket_and_a_server_fetches_them(
    settings: Settings, tmp_path: Path, s3_endpoint: str, bucket: str
) -> None:
    registry = open_registry(settings)
    assert isinstance(registry.blobs, S3BlobStore)
    folder = write_random_adapter(tmp_path / "a", DIMS, seed=3)
    version = registry.push(folder, "sales").version
    assert registry.push(folder, "sales").created is False
    keys = _objects(s3_endpoint, bucket)
    assert keys == sorted(f"team/adapters/{blob_key(d)}" for d in version.files.values())
    registry.check()

    # a "server" with its own empty cache resolves and downloads, sha256-verified
    server_settings = _elsewhere(settings, tmp_path / "server-home")
    source = RegistryAdapterSource(open_registry(server_settings), base_spec(settings).fingerprint)
    resolved = source.resolve("sales")
    assert (resolved.version, resolved.name) == ("sales@v1", "sales")
    assert resolved.path.is_relative_to(tmp_path / "server-home")
    assert (resolved.path / WEIGHTS).read_bytes() == (folder / WEIGHTS).read_bytes()
    assert source.names() == ["sales"]
    source.check()

    # later resolves use the local cache: the bucket is no longer needed for this version
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for key in keys:
        s3.delete_object(Bucket=bucket, Key=key)
    assert source.resolve("sales@v1").path == resolved.path


def test_a_corrupt_object_is_refused_on_arrival(
    settings: Settings, tmp_path: Path, s3_endpoint: str, bucket: str
) -> None:
    registry = open_registry(settings)
    version = registry.push(write_random_adapter(tmp_path / "a", DIMS), "sales").version
    key = f"team/adapters/{blob_key(version.files[WEIGHTS])}"
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(Bucket=bucket, Key=key, Body=b"evil")
    fresh = open_registry(_elsewhere(settings, tmp_path / "other"))
    with pytest.raises(Unavailable, match="sha256"):
        RegistryAdapterSource(fresh).resolve("sales")
    assert not any((tmp_path / "other" / "cache" / "adapters").iterdir())


def test_a_missing_object_is_unavailable(
    settings: Settings, tmp_path: Path, s3_endpoint: str, bucket: str
) -> None:
    registry = open_registry(settings)
    registry.push(write_random_adapter(tmp_path / "a", DIMS), "sales")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for key in _objects(s3_endpoint, bucket):
        s3.delete_object(Bucket=bucket, Key=key)
    fresh = open_registry(_elsewhere(settings, tmp_path / "other"))
    with pytest.raises(Unavailable, match="blob store is incomplete"):
        RegistryAdapterSource(fresh).resolve("sales")


def test_check_fails_for_a_missing_bucket(settings: Settings, s3_endpoint: str) -> None:
    store = S3BlobStore("no-such-bucket-here", "x", endpoint_url=s3_endpoint)
    with pytest.raises(Unavailable, match="no-such-bucket-here"):
        store.check()


def test_gc_removes_unreferenced_objects_and_spares_a_racing_push(
    settings: Settings, tmp_path: Path, s3_endpoint: str, bucket: str
) -> None:
    registry = open_registry(settings)
    v1 = registry.push(write_random_adapter(tmp_path / "a", DIMS, seed=1), "sales").version
    registry.push(write_random_adapter(tmp_path / "b", DIMS, seed=2), "sales")
    registry.promote("sales@v2")
    registry.delete("sales@v1")
    orphan = v1.files[WEIGHTS]
    noise = f"team/adapters/sha256/zz/{'z' * 64}"  # not a blob key: never touched
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(Bucket=bucket, Key=noise, Body=b"")
    assert registry.gc(grace_seconds=3600).kept_young == [orphan]
    dry = registry.gc(grace_seconds=0)
    assert (list(dry.orphans), dry.deleted) == ([orphan], [])
    assert registry.blobs.exists(orphan)

    # a push of the same weights whose record lands after a gc deleted the object
    add_version = registry.catalog.add_version

    def gc_then_add(*args, **kwargs):  # type: ignore[no-untyped-def]
        assert registry.gc(grace_seconds=0, delete=True).deleted == [orphan]
        return add_version(*args, **kwargs)

    registry.catalog.add_version = gc_then_add  # type: ignore[method-assign]
    again = registry.push(write_random_adapter(tmp_path / "c", DIMS, seed=1), "other").version
    registry.catalog.add_version = add_version  # type: ignore[method-assign]
    assert again.files[WEIGHTS] == orphan and registry.blobs.exists(orphan)
    assert registry.gc(grace_seconds=0).orphans == {}
    assert noise in _objects(s3_endpoint, bucket)
