"""Admin routes (admin key only), health and readiness, and adapter names that try to be
paths, over HTTP with a fake engine.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from route_checks import BASE, assert_error, chat

from loraplex.errors import Unavailable

if TYPE_CHECKING:
    from fake_engine import FakeEngine
    from route_checks import Serve

pytestmark = pytest.mark.anyio
ADMIN_KEY = "admin-secret"
DORA_REFUSED = "Adapter 'sales' is refused: adapter_config.json uses DoRA, which vLLM cannot serve."


async def version_of(client: httpx.AsyncClient, name: str) -> str:
    """The version ``name`` resolves to, as the admin listing reports it."""
    response = await client.get("/admin/adapters", headers=admin())
    return {row["name"]: row["version"] for row in response.json()["adapters"]}[name]


def admin(key: str = ADMIN_KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# ---- admin routes: admin key only


async def test_admin_routes_are_off_without_an_admin_key(client: httpx.AsyncClient) -> None:
    response = await client.get("/admin/adapters", headers=admin())
    assert "LORAPLEX_ADMIN_KEY" in assert_error(response, 401, "invalid_api_key")


@pytest.mark.parametrize(
    "headers",
    [{}, admin("wrong"), {"authorization": ADMIN_KEY}, {"authorization": f"Basic {ADMIN_KEY}"}],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/admin/adapters"), ("POST", "/admin/adapters/sales/load")],
)
async def test_admin_routes_refuse_a_missing_or_wrong_key(
    serve: Serve, engine: FakeEngine, headers: dict, method: str, path: str
) -> None:
    async with serve(admin_key=ADMIN_KEY) as client:
        response = await client.request(method, path, headers=headers)
    assert_error(response, 401, "invalid_api_key")
    assert not engine.loads


async def test_admin_load_pin_unload_and_residency(serve: Serve, engine: FakeEngine) -> None:
    async with serve(admin_key=ADMIN_KEY) as client:
        version = await version_of(client, "sales")
        load = await client.post("/admin/adapters/sales/load", headers=admin())
        assert load.json() == {"adapter": version, "already_loaded": False}
        again = await client.post(f"/admin/adapters/{version}/load", headers=admin())
        assert again.json() == {"adapter": version, "already_loaded": True}
        pin = await client.post("/admin/adapters/support/pin", headers=admin())
        support = pin.json()["adapter"]
        assert pin.json() == {"adapter": support, "pinned": True}
        listing = (await client.get("/admin/adapters", headers=admin())).json()
        assert listing["adapters"] == [
            {"name": "sales", "version": version, "residency": "cpu"},
            {"name": "support", "version": support, "residency": "pinned"},
        ]
        unload = await client.post("/admin/adapters/sales/unload", headers=admin())
        assert unload.json() == {"adapter": version, "unloaded": True, "streams_finishing": 0}
        listing = (await client.get("/admin/adapters", headers=admin())).json()
        assert listing["loaded"] == [{"version": support, "residency": "pinned"}]
        missing = await client.post("/admin/adapters/nope/load", headers=admin())
        assert_error(missing, 404, "model_not_found")


async def test_an_invalid_folder_adapter_fails_alone_before_the_engine(
    serve: Serve, engine: FakeEngine, adapters_root: Path
) -> None:
    config = adapters_root / "sales" / "adapter_config.json"
    config.write_text(config.read_text().replace('"use_dora": false', '"use_dora": true'))
    async with serve(admin_key=ADMIN_KEY) as client:
        for path in ("/v1/chat/completions", "/admin/adapters/sales/load"):
            body = chat("sales") if path.startswith("/v1") else None
            response = await client.post(path, json=body, headers=admin())
            message = assert_error(response, 400, "invalid_adapter")
            assert message == DORA_REFUSED
        listing = (await client.get("/admin/adapters", headers=admin())).json()["adapters"]
        assert listing[0] == {
            "name": "sales",
            "version": None,
            "residency": "refused",
            "error": message,
        }
        assert (await client.post("/v1/chat/completions", json=chat("support"))).status_code == 200
        assert (await client.get("/health")).status_code == 200
    assert engine.loads == [listing[1]["version"]]


# ---- health and readiness


async def test_health_and_ready(client: httpx.AsyncClient) -> None:
    health = await client.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = await client.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "model": BASE, "registry": {"ok": True}}
    assert "loraplex_ready 1.0" in (await client.get("/metrics")).text


async def test_neither_alive_nor_ready_when_the_engine_is_dead(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.health_error = Unavailable("engine died")
    assert assert_error(await client.get("/ready"), 503, "unavailable") == "engine died"
    assert assert_error(await client.get("/health"), 503, "unavailable") == "engine died"


async def test_ready_reports_adapters_that_cannot_be_read_without_turning_503(
    client: httpx.AsyncClient, adapters_root: Path
) -> None:
    shutil.rmtree(adapters_root)
    ready = await client.get("/ready")
    assert ready.status_code == 200
    state = ready.json()["registry"]
    assert state["ok"] is False and "does not exist" in state["error"]


async def test_the_lifespan_starts_and_stops_the_engine(serve: Serve, engine: FakeEngine) -> None:
    async with serve() as client:
        assert (await client.get("/ready")).status_code == 200
        assert not engine.stopped
    assert engine.stopped


# ---- names are never paths, however they are spelt over HTTP


async def test_encoded_dots_in_admin_paths_are_not_a_parent_folder(
    serve: Serve, engine: FakeEngine, escapes: Path
) -> None:
    async with serve(admin_key=ADMIN_KEY) as client:
        response = await client.post("/admin/adapters/%2e%2e/load", headers=admin())
    assert "is not a valid adapter name" in assert_error(response, 404, "model_not_found")
    assert not engine.loads


@pytest.mark.parametrize("model", ["..", "../outside/evil", "{outside}"])
async def test_paths_in_model_are_404(
    client: httpx.AsyncClient, engine: FakeEngine, escapes: Path, model: str
) -> None:
    response = await client.post(
        "/v1/chat/completions", json=chat(model.format(outside=escapes.parent / "outside" / "evil"))
    )
    assert "is not a valid adapter name" in assert_error(response, 404, "model_not_found")
    assert not engine.generations and not engine.loads
