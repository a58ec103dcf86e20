"""A server backed by the registry: ``N``, ``N@vK`` and ``N:canary`` serve the right version
(``x-loraplex-adapter``), a promote or rollback is served within 1 s with no restart, and 20
of them under continuous load on three adapters fail no request and serve only versions the
alias pointed at while each request was in flight (give or take that 1 s)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from loraplex.config import Settings
from loraplex.registry.registry import Registry, open_registry
from loraplex.testing.launcher import RunningServer, loraplex_server, server_env
from loraplex.testing.rollout_load import AliasTimeline, RolloutLoad, move_alias
from loraplex.testing.scrape import metric_sum

pytestmark = pytest.mark.integration
BASE_NAME = "smollm2-135m"
ROLLOUT_BOUND_S = 1.0  # issue 12: a promote or rollback reaches every server within 1 s


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
    names = [
        m["id"] for m in httpx.get(registry_server.url + "/v1/models", timeout=30).json()["data"]
    ]
    assert "sales" in names


def test_promote_and_rollback_are_seen_without_restart(
    registry_server: RunningServer, registry: Registry
) -> None:
    registry.promote("sales@v2")
    time.sleep(ROLLOUT_BOUND_S)
    assert complete(registry_server, "sales")[1] == "sales@v2"
    registry.rollback("sales")
    time.sleep(ROLLOUT_BOUND_S)
    assert complete(registry_server, "sales")[1] == "sales@v1"


def test_twenty_moves_under_load_fail_nothing_and_serve_only_targets(
    registry_server: RunningServer,
    registry: Registry,
    home: Path,
    make_random_adapter: Callable[..., Path],
) -> None:
    names = ("sales", "alpha", "beta")
    for name, seeds in (("alpha", (21, 22)), ("beta", (31, 32))):
        for seed in seeds:
            registry.push(make_random_adapter(home / "src" / f"{name}{seed}", seed=seed), name)
    timeline = AliasTimeline()
    for name in names:
        timeline.start(name, registry.resolve(name).key)
    time.sleep(ROLLOUT_BOUND_S)  # the server knows the new names
    with RolloutLoad(registry_server.url, names, workers=3) as load:
        for move in range(20):
            move_alias(registry, timeline, names[move % 3], move)
            time.sleep(0.3)
        time.sleep(ROLLOUT_BOUND_S)
    assert load.failures == []
    assert {a.model for a in load.answers} == set(names)
    assert {a.version for a in load.answers} & {"sales@v2", "alpha@v2", "beta@v2"}
    assert timeline.explain(load.answers, slack=ROLLOUT_BOUND_S) == []


@pytest.mark.parametrize("model", ["sales:beta", "sales@v9", "ghost", "ghost:canary"])
def test_unknown_versions_and_aliases_are_404(registry_server: RunningServer, model: str) -> None:
    status, header, _ = complete(registry_server, model)
    assert (status, header) == (404, None)


def test_a_version_that_cannot_load_falls_back_labelled_and_counted(
    registry_server: RunningServer, home: Path, base_model_dir: Path, make_random_adapter
) -> None:
    """Rank 32 passes a registry that allows it, but this server takes rank 16: pushed with
    fallback, its requests are served by the base model, labelled, and counted."""
    wide = open_registry(
        Settings(home=home, base_model=base_model_dir, registry_url=None, blob_url=None)
    )
    try:
        folder = make_random_adapter(home / "src" / "wide", seed=31, rank=32)
        wide.push(folder, "wide", tenant="acme", fallback_to_base=True)
    finally:
        wide.close()
    before = metric_sum(registry_server.url, "loraplex_fallbacks_total", adapter="wide")
    body = {"model": "wide", "prompt": "The weather today is", "max_tokens": 4, "temperature": 0}
    deadline = time.monotonic() + 5  # the push reaches the server's name cache within 1 s
    while (
        response := httpx.post(registry_server.url + "/v1/completions", json=body, timeout=180)
    ).status_code == 404:
        assert time.monotonic() < deadline, response.text
        time.sleep(0.2)
    assert response.status_code == 200, response.text
    assert response.headers["x-loraplex-fallback"] == "base"
    assert metric_sum(registry_server.url, "loraplex_fallbacks_total", adapter="wide") == before + 1
