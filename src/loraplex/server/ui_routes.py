"""The web console: ``GET /ui`` (static page, no build step) and its data, ``/admin/console``.

The page and its script live in ``loraplex/server/ui/`` and hold no data: the page asks for the
admin key (kept in the browser tab's sessionStorage) and polls ``/admin/console``, which like
every admin route needs that key. The console shows adapters with their versions, aliases, eval
verdicts and residency, each adapter's request rate and p50/p99 latency live, tenants' usage and
the recent failed requests.
"""

from __future__ import annotations

import asyncio
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from loraplex.errors import LoraplexError, NotFound
from loraplex.server.admin_routes import require_admin
from loraplex.server.service import Service

STATIC = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
LIVE_WINDOW_SECONDS = 30.0

router = APIRouter()
console = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


def _static(name: str) -> Response:
    body = files("loraplex.server").joinpath("ui", name).read_bytes()
    return Response(body, media_type=STATIC[name], headers={"cache-control": "no-cache"})


@router.get("/ui", include_in_schema=False)
async def page() -> Response:
    """The console page (it asks for the admin key before it shows anything)."""
    return _static("index.html")


@router.get("/ui/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    """The console's script and style sheet (a fixed list: nothing else is served)."""
    if name not in STATIC:
        raise NotFound(f"/ui/{name} does not exist.")
    return _static(name)


def _adapters(service: Service) -> list[dict[str, Any]]:
    """Each adapter with versions, aliases, evals (registry) and its versions' residency."""
    residency = service.engine.residency()
    registry = getattr(service.source, "registry", None)
    rows = []
    for name in service.source.names():
        row: dict[str, Any] = {"name": name, "versions": [], "aliases": {}, "evals": []}
        try:
            if registry is not None:
                record = registry.show(name).to_dict()
                row["aliases"] = record["aliases"]
                row["evals"] = [
                    {k: e[k] for k in ("version", "suite", "passed")} for e in record["evals"]
                ]
                row["versions"] = [v["version"] for v in record["versions"]]
            else:
                row["versions"] = [service.source.resolve(name).version]
        except LoraplexError as exc:
            row["error"] = exc.message
        row["residency"] = {v: residency.get(v, "cold") for v in row["versions"]}
        rows.append(row)
    return rows


@console.get("/console")
async def console_data(request: Request) -> dict[str, Any]:
    """What the console shows, in one response."""
    service: Service = request.app.state.service
    accounts = request.app.state.auth.accounts
    usage: list[dict[str, Any]] = []
    if accounts is not None:
        await service.usage.flush()
        usage = [row.to_dict() for row in await asyncio.to_thread(accounts.usage, None, None)]
    return {
        "model": service.base_name,
        "adapters": await asyncio.to_thread(_adapters, service),
        "live": request.app.state.live_stats.snapshot(LIVE_WINDOW_SECONDS),
        "window_seconds": LIVE_WINDOW_SECONDS,
        "usage": usage,
        "errors": request.app.state.recent_errors.items()[::-1],
    }
