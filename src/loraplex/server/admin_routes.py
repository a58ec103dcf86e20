"""Admin routes (admin key only): preload, unload and pin adapters; residency; usage.

``Authorization: Bearer <LORAPLEX_ADMIN_KEY>``; a tenant's key gets 403, no key 401. Without
a configured admin key the routes answer 401 with a message saying how to enable them. ``{N}``
accepts the same forms as ``model`` (``N``, ``N@vK``, ``N:alias``) and is resolved like a
request.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request

from loraplex.adapters import ResolvedAdapter
from loraplex.errors import Conflict, InvalidRequest, TooLarge, Unavailable
from loraplex.server.service import Service


async def require_admin(request: Request) -> None:
    """401 without the admin key, 403 for a tenant's key."""
    await request.app.state.auth.require_admin(request)


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


async def _resolve(request: Request, model: str) -> tuple[Service, ResolvedAdapter]:
    service: Service = request.app.state.service
    return service, await asyncio.to_thread(service.source.resolve, model)


@router.post("/adapters/{model}/load")
async def load(model: str, request: Request) -> dict[str, Any]:
    """Load an adapter version into the engine ahead of its first request."""
    service, adapter = await _resolve(request, model)
    return {"adapter": adapter.version, "already_loaded": await service.engine.load(adapter)}


@router.post("/adapters/{model}/unload")
async def unload(model: str, request: Request) -> dict[str, Any]:
    """Drop an adapter version from the engine; it loads again on its next request."""
    service, adapter = await _resolve(request, model)
    in_flight = await service.engine.unload(adapter)
    return {"adapter": adapter.version, "unloaded": True, "streams_finishing": in_flight}


@router.post("/adapters/{model}/pin")
async def pin(model: str, request: Request) -> dict[str, Any]:
    """Load an adapter version and keep it from being evicted (409 beyond the pin bound)."""
    service, adapter = await _resolve(request, model)
    await service.engine.pin(adapter)
    return {"adapter": adapter.version, "pinned": True}


@router.get("/adapters")
async def adapters(request: Request) -> dict[str, Any]:
    """Every servable adapter with the version it resolves to and where it lives now.

    An adapter that fails its checks is listed with ``version`` null and the ``error`` a
    request gets. ``loaded`` is the server's residency, ``engine`` what the engine itself
    reports loaded (the two agree), ``failed`` the versions refused for now because their
    load failed.
    """
    service: Service = request.app.state.service
    residency, in_engine = await service.engine.residency_and_engine()
    rows: list[dict[str, Any]] = []
    for name in await asyncio.to_thread(service.source.names):
        try:
            version = (await _resolve(request, name))[1].version
        except (InvalidRequest, Conflict, TooLarge) as exc:
            rows.append(
                {"name": name, "version": None, "residency": "refused", "error": exc.message}
            )
            continue
        rows.append({"name": name, "version": version, "residency": residency.get(version, "cold")})
    loaded = [{"version": v, "residency": where} for v, where in residency.items()]
    return {
        "adapters": rows,
        "loaded": loaded,
        "engine": in_engine,
        "failed": service.engine.failed_loads(),
    }


@router.get("/usage")
async def usage(request: Request, since: str | None = None, until: str | None = None) -> Any:
    """Requests and tokens per tenant and adapter version in ``[since, until)``.

    Times are ISO 8601 or ages such as ``-1h``; counts not yet written are written first.
    """
    from loraplex.registry.accounts import parse_time

    service: Service = request.app.state.service
    accounts = request.app.state.auth.accounts
    if accounts is None:
        raise Unavailable("Usage is not recorded: this server has no registry database.")
    window = [parse_time(value) if value else None for value in (since, until)]
    await service.usage.flush()
    rows = await asyncio.to_thread(accounts.usage, *window)
    return {"since": since, "until": until, "usage": [row.to_dict() for row in rows]}
