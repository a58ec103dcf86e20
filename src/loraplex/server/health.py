"""Liveness, readiness and metrics routes.

``/health`` (liveness): 503 when the engine is dead, or stalled (requests wait and it has
produced no token for ``stall_seconds``); 200 while it loads or drains. ``/ready``: the engine
serves and the server is not draining (503 with the reason otherwise); its body reports whether
the adapter registry (or folder) can be read, which alone never makes it 503: a registry outage
must not take every replica out of rotation, since the base model and adapters already resolved
are still served. ``/metrics``: Prometheus text; it names tenants and adapters, so with auth on
it needs the admin key or the metrics key.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loraplex.errors import LoraplexError, Unavailable
from loraplex.server.service import Service

router = APIRouter()
REGISTRY_WAIT_SECONDS = 1.0
"""Longest ``/ready`` waits for the registry's state (probes have short timeouts)."""


async def check_engine_alive(service: Service) -> None:
    """Raise ``Unavailable`` if the engine is dead or stalled."""
    await service.engine.check_health()
    stalled = service.progress.stalled_for()
    limit = service.settings.stall_seconds
    if stalled > limit:
        raise Unavailable(
            f"The inference engine is stalled: {service.progress.waiting} request(s) wait and "
            f"it has produced no token for {stalled:.0f} s (limit {limit:g} s)."
        )


@router.get("/health")
async def health(request: Request) -> dict[str, str]:
    """200 while the engine is alive and making progress (or still loading), else 503."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        return {"status": "starting"}
    await check_engine_alive(service)
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> dict[str, Any]:
    """200 when the engine is healthy (503 with the reason otherwise), with the registry's
    state in the body."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise Unavailable("The engine is starting.")
    if request.app.state.lifecycle.draining:
        raise Unavailable("The server is shutting down.", retry_after=2)
    await check_engine_alive(service)
    return {
        "status": "ready",
        "model": service.base_name,
        "registry": await registry_state(service.source),
    }


async def registry_state(source: Any) -> dict[str, Any]:
    """``{"ok": True}``, or ``{"ok": False, "error": why}`` when the adapter source (registry
    database and blob store, or folder) cannot be read, or gives no answer within
    ``REGISTRY_WAIT_SECONDS`` (the check goes on in the background, bounded by the source)."""
    try:
        await asyncio.wait_for(asyncio.to_thread(source.check), REGISTRY_WAIT_SECONDS)
    except TimeoutError:
        return {"ok": False, "error": f"no answer within {REGISTRY_WAIT_SECONDS:g} s"}
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        message = exc.message if isinstance(exc, LoraplexError) else str(exc)
        return {"ok": False, "error": message}
    return {"ok": True}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus exposition of the server's metrics."""
    await request.app.state.auth.require_metrics(request)
    metrics = request.app.state.metrics
    if metrics.engine.engine is not None:
        await metrics.engine.engine.refresh_stats()
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
