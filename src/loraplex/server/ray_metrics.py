"""Each Ray Serve replica's ``/metrics``, reachable by Prometheus.

Requests through Ray Serve's proxy reach one replica or another, so ``/metrics`` there says
nothing reliable. Each replica therefore also listens on a port of its own (a free one on
``settings.host``) that serves only the app's ``/metrics`` route (same auth: the admin or
metrics key when auth is on), and records ``HOST:PORT`` in Ray's key-value store. The router's
``GET /ray/targets`` lists them in Prometheus' HTTP service-discovery format, leaving out
those that no longer accept connections (a replica that died; its entry is dropped).
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import ray
from fastapi import FastAPI
from ray.experimental import internal_kv

from loraplex.config import Settings

KV_NAMESPACE = "loraplex"
KV_PREFIX = "metrics-target/"


def metrics_only(app: FastAPI) -> Any:
    """An ASGI app that passes ``GET /metrics`` to ``app`` and answers 404 to the rest."""

    async def serve(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/metrics":
            await app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"only /metrics here"})

    return serve


async def start_metrics_server(app: FastAPI, settings: Settings, replica: str) -> asyncio.Task:
    """Serve ``app``'s ``/metrics`` on a free port and register it; return the serving task."""
    import uvicorn

    from loraplex.server.serve_cli import bind_socket

    sock = bind_socket(settings.host, 0)
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = ray.util.get_node_ip_address()
    target = f"{host}:{sock.getsockname()[1]}"
    server = uvicorn.Server(
        uvicorn.Config(metrics_only(app), lifespan="off", log_level="warning", access_log=False)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await asyncio.to_thread(
        internal_kv._internal_kv_put, KV_PREFIX + replica, target, namespace=KV_NAMESPACE
    )
    return task


def reachable(target: str, timeout: float = 1.0) -> bool:
    """Whether ``HOST:PORT`` accepts a TCP connection."""
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def live_targets() -> list[dict[str, Any]]:
    """Prometheus HTTP SD: one group per replica whose metrics port answers."""
    groups = []
    for key in internal_kv._internal_kv_list(KV_PREFIX, namespace=KV_NAMESPACE):
        raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        replica = key.decode()[len(KV_PREFIX) :]
        target = raw.decode() if raw else ""
        if target and reachable(target):
            groups.append({"targets": [target], "labels": {"replica": replica}})
        else:
            internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)
    return groups


def targets_json() -> bytes:
    """``live_targets`` as the JSON body Prometheus reads."""
    return json.dumps(live_targets()).encode()
