"""A server backed by the registry: ``N``, ``N@vK`` and ``N:canary`` serve the right version
(``x-loraplex-adapter``), and a promote or rollback is seen at once, with no restart."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from loraplex.config import Settings
from loraplex.registry.registry import Registry, open_registry
from loraplex.testing.launcher import RunningServer, loraplex_server, server_env

pytestmark = pytest.mark.integration
BASE_NAME = "smollm2-135m"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry-home")


@pytest.fixture(scope="module")
def registry(
    home: Path, base_model_dir: Path, make_random_adapter: Callable[..., Path]
) -> Iterator[Registry]:
    """``sales`` v1..v3 (stable -> v1, canary -> v3), pushed before the server starts."""
    reg = open_registry(
        Settings(
            home=home, base_model=base_model_dir, max_lora_rank=16, registry_url=None, blob_url=None
        )
    )
    for seed in (11, 12, 13):
        folder = make_random_adapter(home / "src" / f"s{seed}", seed=seed, rank=8)
        reg.push(folder, "sales", tenant="acme")
    reg.promote("sales@v3", "canary")
    yield reg
    reg.close()


@pytest.fixture(scope="module")
def registry_server(
    home: Path, base_model_dir: Path, registry: Registry
) -> Iterator[RunningServer]:
    env = server_env(home, base_model_dir, served_model_name=BASE_NAME)
    inherited = {k for k in os.environ if k.startswith("LORAPLEX_") and k not in env}
    assert not inherited & {"LORAPLEX_ADAPTERS_DIR", "LORAPLEX_REGISTRY_URL", "LORAPLEX_BLOB_URL"}
    with loraplex_server(home / "server.log", env=env) as running:
        yield running


def complete(server: RunningServer, model: str) -> tuple[int, str | None, str]:
    body = {"model": model, "prompt": "The weather today is", "max_tokens": 8, "temperature": 0}
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=180)
    text = response.json()["choices"][0]["text"] if response.status_code == 200 else ""
    return response.status_code, response.headers.get("x-loraplex-adapter"), text


def test_references_serve_the_right_version(registry_server: RunningServer) -> None:
    served = {
        m: complete(registry_server, m)
        for m in ("sales", "sales@v2", "sales:canary", "sales@v1", "sales@v3")
    }
    assert {m: (s, h) for m, (s, h, _) in served.items()} == {
        "sales": (200, "sales@v1"),
        "sales@v2": (200, "sales@v2"),
        "sales:canary": (200, "sales@v3"),
        "sales@v1": (200, "sales@v1"),
        "sales@v3": (200, "sales@v3"),
    }
    # the engine ran the resolved weights: same version, same greedy text (fp32)
    assert served["sales"][2] == served["sales@v1"][2]
    assert served["sales:canary"][2] == served["sales@v3"][2]
    assert served["sales@v1"][2] != served["sales@v3"][2]
    names = [m["id"] for m in httpx.get(registry_server.url + "/v1/models").json()["data"]]
    assert "sales" in names


def test_promote_and_rollback_are_seen_without_restart(
    registry_server: RunningServer, registry: Registry
) -> None:
    registry.promote("sales@v2")
    assert complete(registry_server, "sales")[1] == "sales@v2"
    registry.rollback("sales")
    assert complete(registry_server, "sales")[1] == "sales@v1"


@pytest.mark.parametrize("model", ["sales:beta", "sales@v9", "ghost", "ghost:canary"])
def test_unknown_versions_and_aliases_are_404(registry_server: RunningServer, model: str) -> None:
    status, header, _ = complete(registry_server, model)
    assert (status, header) == (404, None)
