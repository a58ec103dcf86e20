"""Fixtures shared by the unit tests: tiny registries, the client stub server, and the
server app over a fake engine."""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from adapter_files import write_adapter_files
from fake_engine import FakeEngine
from route_checks import Serve
from stub_server import StubServer, stub_server

from loraplex.adapters import AdapterSource
from loraplex.basemodel import bundled_model_dir
from loraplex.config import Settings
from loraplex.registry.basedims import BaseDims
from loraplex.registry.blob_cache import BlobCache
from loraplex.registry.blobs import LocalBlobStore
from loraplex.registry.catalog import Catalog
from loraplex.registry.registry import Registry
from loraplex.registry.validate import BaseSpec
from loraplex.server import app as app_module
from loraplex.server.app import create_app, default_source
from loraplex.server.prompts import PromptBuilder

# ---- registry: a tiny fake base model, and registries on SQLite + local blobs under tmp_path


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_dims: BaseDims) -> Path:
    """For CLI tests: a fake base model folder of ``tiny_dims`` and an empty LORAPLEX_HOME."""
    import numpy as np
    from safetensors.numpy import save_file

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(asdict(tiny_dims)))
    save_file({"w": np.zeros(4, np.float32)}, base / "model.safetensors")
    for key in ("REGISTRY_URL", "BLOB_URL", "S3_ENDPOINT_URL"):
        monkeypatch.delenv(f"LORAPLEX_{key}", raising=False)
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORAPLEX_BASE_MODEL", str(base))
    monkeypatch.setenv("LORAPLEX_USER", "tester")
    return tmp_path


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


# ---- client: the stub OpenAI-style server (stub_server.py)


@pytest.fixture
def stub() -> Iterator[StubServer]:
    """The stub server running on a free local port for one test."""
    with stub_server() as server:
        yield server


# ---- server: the real app over ``FakeEngine`` (fake_engine.py), driven in-process over ASGI.
# The lifespan prepares the bundled model under LORAPLEX_HOME; only its tokenizer is used.


@pytest.fixture
def anyio_backend() -> str:
    """Async tests (``pytest.mark.anyio``) run on asyncio."""
    return "asyncio"


@pytest.fixture
def adapters_root(tmp_path: Path) -> Path:
    """An adapters folder holding ``sales`` and ``support``."""
    root = tmp_path / "adapters"
    write_adapter_files(root / "sales", seed=1)
    write_adapter_files(root / "support", seed=2)
    return root


@pytest.fixture
def escapes(adapters_root: Path) -> Path:
    """``adapters_root`` beside real adapters it must never serve: its parent folder,
    ``../outside/evil``, ``team/sales`` below it, and the symlinks ``link`` (to
    ``../outside/evil``) and ``sneaky/adapter_model.safetensors`` leading out of it."""
    parent, outside = adapters_root.parent, adapters_root.parent / "outside" / "evil"
    write_adapter_files(outside, seed=3)
    write_adapter_files(adapters_root / "team" / "sales", seed=4)
    write_adapter_files(parent, seed=5)
    (adapters_root / "link").symlink_to(outside, target_is_directory=True)
    sneaky = adapters_root / "sneaky"
    sneaky.mkdir()
    shutil.copy(outside / "adapter_config.json", sneaky)
    (sneaky / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    return adapters_root


@pytest.fixture
def engine() -> FakeEngine:
    """The engine the ``serve``d app uses; tests set its failures and read its calls."""
    return FakeEngine()


@pytest.fixture(scope="session")
def prompt_builder() -> Callable[[Path, int, int], PromptBuilder]:
    """``PromptBuilder`` made once per model folder and length (a tokenizer load takes ~0.5 s)."""
    return functools.cache(PromptBuilder)


@pytest.fixture
def serve(
    engine: FakeEngine,
    adapters_root: Path,
    prompt_builder: Callable[[Path, int, int], PromptBuilder],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Serve:
    """``async with serve(**settings) as client``: the app started (lifespan run) with ``engine``.

    Adapters come from ``adapters_root`` unless ``source=`` gives another ``AdapterSource``;
    other keywords are ``Settings`` fields (admin routes are off unless ``admin_key`` is given;
    auth is off unless ``auth="on"``; tenants and usage live in a registry database under
    ``tmp_path``).
    """
    monkeypatch.setattr(app_module, "PromptBuilder", prompt_builder)
    # Freezing would keep the test process's garbage from collection for the whole session.
    monkeypatch.setattr(app_module, "freeze_startup_heap", lambda: None)

    @asynccontextmanager
    async def start(
        source: AdapterSource | None = None, **settings: Any
    ) -> AsyncIterator[httpx.AsyncClient]:
        app = create_app(
            Settings(
                **{
                    "adapters_dir": adapters_root,
                    "admin_key": None,
                    "auth": "off",
                    "registry_url": f"sqlite:///{tmp_path / 'registry.db'}",
                    **settings,
                }
            ),
            engine_factory=lambda _settings, _model_dir: engine,
            source_factory=default_source if source is None else lambda _s, _b: source,
        )
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app), base_url="http://loraplex"
            ) as client,
        ):
            yield client

    return start


@pytest.fixture
async def client(serve: Serve) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app with default settings and the ``adapters_root`` adapters."""
    async with serve() as client:
        yield client


@pytest.fixture
def model_dir() -> Path:
    """The prepared bundled model (skips where it is not prepared; CI prepares it)."""
    path = bundled_model_dir(Settings().models_dir)
    if not (path / "config.json").is_file():
        pytest.skip("the bundled model is not prepared (loraplex model prepare)")
    return path
