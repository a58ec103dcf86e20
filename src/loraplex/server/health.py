"""Liveness, readiness and metrics routes.

``/health`` (liveness): 503 when the engine is dead, or stalled (requests wait and it has
produced no token for ``stall_seconds``); 200 while it loads or drains. ``/ready``: the engine
serves, the server is not draining, and the adapter source can be read (503 with the reason
otherwise). ``/metrics``: Prometheus text; it names tenants and
adapters, so with auth on it needs the admin key or the metrics key.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loraplex.errors import Unavailable
from loraplex.server.service import Service

router = APIRouter()


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
    """200 when the engine is healthy and adapters are readable, else 503 with the reason."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise Unavailable("The engine is starting.")
    if request.app.state.lifecycle.draining:
        raise Unavailable("The server is shutting down.", retry_after=2)
    await check_engine_alive(service)
    try:
        await asyncio.to_thread(service.source.check)
    except Exception as exc:
        raise Unavailable(f"The adapter store cannot be read: {exc}") from exc
    return {"status": "ready", "model": service.base_name}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus exposition of the server's metrics."""
    await request.app.state.auth.require_metrics(request)
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
