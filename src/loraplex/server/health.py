"""Liveness, readiness and metrics routes.

``/health``: the process answers. ``/ready``: the engine serves and the adapter source can
be read (503 with the reason otherwise). ``/metrics``: Prometheus text; it names tenants and
adapters, so with auth on it needs the admin key or the metrics key.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loraplex.errors import Unavailable

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    """Always 200 while the process runs."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> dict[str, Any]:
    """200 when the engine is healthy and adapters are readable, else 503 with the reason."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise Unavailable("The engine is starting.")
    await service.engine.check_health()
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
