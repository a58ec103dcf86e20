"""The engine runs an eviction and the load it makes room for in the order they were sent.

``VllmEngine`` sends the removal of a victim and the add of the new version together, without
waiting for the removal's reply (one round trip per load). That is only right if vLLM's engine
core runs utility calls in the order sent: an add that ran first, into a full CPU cache, would
let vLLM evict its own least recently used adapter. This server (2 slots, 2 CPU-cache entries,
real engine) makes that adapter differ from the server's victim, so an add run first would
leave the server's residency and the engine disagreeing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from loraplex.testing.launcher import RunningServer, loraplex_server, server_env

pytestmark = pytest.mark.integration

ADMIN_KEY = "eviction-order-admin-key"


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path, make_random_adapter: Callable
) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("eviction-order-adapters")
    for seed, name in enumerate(("one", "two", "three"), start=30):
        make_random_adapter(folder / name, seed=seed)
    home = tmp_path_factory.mktemp("eviction-order-home")
    env = server_env(
        home,
        base_model_dir,
        adapters_dir=folder,
        admin_key=ADMIN_KEY,
        max_loras=2,
        max_cpu_loras=2,
        max_pinned_adapters=1,
    )
    with loraplex_server(home / "server.log", env=env) as running:
        yield running


def admin_post(server: RunningServer, action: str, model: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    url = f"{server.url}/admin/adapters/{model}/{action}"
    return httpx.post(url, headers=headers, timeout=300)


def test_the_victim_leaves_the_engine_before_the_new_version_loads(
    server: RunningServer,
) -> None:
    versions = {}
    # "one" loaded again touches only the server's order (it is resident: no engine call),
    # so the server's least recently used is "two" and vLLM's own is still "one".
    for name in ("one", "two", "one"):
        response = admin_post(server, "load", name)
        assert response.status_code == 200, response.text
        versions[name] = response.json()["adapter"]
    response = admin_post(server, "load", "three")
    assert response.status_code == 200, response.text
    versions["three"] = response.json()["adapter"]

    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    body = httpx.get(server.url + "/admin/adapters", headers=headers, timeout=60).json()
    residency = sorted(row["version"] for row in body["loaded"])
    assert residency == sorted([versions["one"], versions["three"]])
    assert body["engine"] == residency, body
    completion = httpx.post(
        server.url + "/v1/completions",
        json={"model": "one", "prompt": "Hello", "max_tokens": 2},
        timeout=120,
    )
    assert completion.status_code == 200, completion.text
