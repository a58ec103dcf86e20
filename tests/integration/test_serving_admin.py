"""Admin routes on the real engine: key required, preload, pin, unload, residency."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.integration


def admin(server, method: str, path: str, key: str | None = "admin") -> httpx.Response:
    headers = (
        {}
        if key is None
        else {"authorization": f"Bearer {server.admin_key if key == 'admin' else key}"}
    )
    return httpx.request(method, server.url + path, headers=headers, timeout=120)


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_admin_needs_the_admin_key(server, key) -> None:
    response = admin(server, "POST", "/admin/adapters/random2/load", key)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_preload_pin_unload_and_residency(server) -> None:
    loaded = admin(server, "POST", "/admin/adapters/random2/load")
    assert loaded.status_code == 200
    version = loaded.json()["adapter"]
    assert version.startswith("random2@")
    assert admin(server, "POST", "/admin/adapters/random2/load").json()["already_loaded"] is True

    assert admin(server, "POST", "/admin/adapters/random2/pin").json()["pinned"] is True
    rows = {r["name"]: r for r in admin(server, "GET", "/admin/adapters").json()["adapters"]}
    assert rows["random2"]["residency"] == "pinned"

    assert admin(server, "POST", "/admin/adapters/random2/unload").status_code == 200
    rows = {r["name"]: r for r in admin(server, "GET", "/admin/adapters").json()["adapters"]}
    assert rows["random2"]["residency"] == "cold"

    body = {"model": "random2", "prompt": "Hello", "max_tokens": 3, "temperature": 0}
    after = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert after.status_code == 200 and after.headers["x-loraplex-adapter"] == version


def test_admin_unknown_adapter_is_404(server) -> None:
    assert admin(server, "POST", "/admin/adapters/nope/load").status_code == 404
