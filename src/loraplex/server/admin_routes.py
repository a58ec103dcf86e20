"""Admin routes (admin key only): preload, unload and pin adapters; see residency.

``Authorization: Bearer <LORAPLEX_ADMIN_KEY>``. Without a configured admin key the routes
answer 401 with a message saying how to enable them. ``{N}`` accepts the same forms as
``model`` (``N``, ``N@vK``, ``N:alias``) and is resolved like a request.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

from fastapi import APIRouter, Depends, Request

from loraplex.adapters import ResolvedAdapter
from loraplex.errors import Unauthorized
from loraplex.server.service import Service

router = APIRouter(prefix="/admin")


def require_admin(request: Request) -> None:
    """401 unless the request carries the configured admin key."""
    expected = request.app.state.settings.admin_key
    if not expected:
        raise Unauthorized("Admin routes are disabled: set LORAPLEX_ADMIN_KEY to enable them.")
    sent = request.headers.get("authorization", "")
    scheme, _, key = sent.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.encode(), expected.encode()):
        raise Unauthorized("Admin routes need 'Authorization: Bearer <admin key>'.")


async def _resolve(request: Request, model: str) -> tuple[Service, ResolvedAdapter]:
    service: Service = request.app.state.service
    return service, await asyncio.to_thread(service.source.resolve, model)


@router.post("/adapters/{model}/load", dependencies=[Depends(require_admin)])
async def load(model: str, request: Request) -> dict[str, Any]:
    """Load an adapter version into the engine ahead of its first request."""
    service, adapter = await _resolve(request, model)
    return {"adapter": adapter.version, "already_loaded": await service.engine.load(adapter)}


@router.post("/adapters/{model}/unload", dependencies=[Depends(require_admin)])
async def unload(model: str, request: Request) -> dict[str, Any]:
    """Drop an adapter version from the engine; it loads again on its next request."""
    service, adapter = await _resolve(request, model)
    await service.engine.unload(adapter)
    return {"adapter": adapter.version, "unloaded": True}


@router.post("/adapters/{model}/pin", dependencies=[Depends(require_admin)])
async def pin(model: str, request: Request) -> dict[str, Any]:
    """Load an adapter version and keep it from being evicted."""
    service, adapter = await _resolve(request, model)
    await service.engine.pin(adapter)
    return {"adapter": adapter.version, "pinned": True}


@router.get("/adapters", dependencies=[Depends(require_admin)])
async def adapters(request: Request) -> dict[str, Any]:
    """Every servable adapter with the version it resolves to and where it lives now."""
    service: Service = request.app.state.service
    residency = service.engine.residency()
    rows = []
    for name in await asyncio.to_thread(service.source.names):
        version = (await _resolve(request, name))[1].version
        rows.append({"name": name, "version": version, "residency": residency.get(version, "cold")})
    loaded = [{"version": v, "residency": where} for v, where in residency.items()]
    return {"adapters": rows, "loaded": loaded}
