"""One loraplex replica on Ray Serve: the app factory's FastAPI app with its own engine.

The class is the same ``create_app`` app behind ``@serve.ingress`` (Ray runs its lifespan, so
the engine starts inside the replica). The ingress router (``ray_router``) calls ``forward`` with
a whole HTTP request and ``multiplexed_model_id`` set to the resolved ``N@vK`` ("" for the base
model); ``forward`` registers that version with Ray Serve's model multiplexing (so the router
prefers replicas that hold it, and at most ``adapters_per_replica`` versions stay here: the
least recently used is unloaded from the engine), runs the request through the app in
process and streams the ASGI messages back. Only ``loraplex serve --ray`` imports this module.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayError

from loraplex.adapters import ResolvedAdapter
from loraplex.config import Settings
from loraplex.errors import LoraplexError
from loraplex.server.app import create_app
from loraplex.server.ray_cpus import bind_engine_threads
from loraplex.server.ray_limits import SharedLimits
from loraplex.server.ray_metrics import start_metrics_server

log = logging.getLogger("loraplex.server")

REPLICA_HEADER = "x-loraplex-replica"
"""Response header naming the Ray Serve replica that served a request."""


class HeldAdapter:
    """An adapter version this replica keeps loaded; Ray Serve awaits ``__del__`` when its
    multiplexing LRU drops the version, which unloads it from the engine."""

    def __init__(self, app: FastAPI, adapter: ResolvedAdapter) -> None:
        self.app = app
        self.adapter = adapter

    async def __del__(self) -> None:
        service = getattr(self.app.state, "service", None)
        if service is not None:
            log.info("ray: %s left this replica's adapter set: unloading", self.adapter.version)
            await service.engine.unload(self.adapter)


def replica_id() -> str:
    """This replica's Ray Serve id."""
    return serve.get_replica_context().replica_id.unique_id


def replica_class(settings: Settings, adapters_per_replica: int) -> type:
    """The deployment class: ``create_app(settings)`` per replica, adapters multiplexed."""

    def build_app() -> FastAPI:
        # runs in the replica's process, before the app's lifespan starts the engine: its own
        # cores, not the ones vLLM's default binding gives every replica of the node (ray_cpus)
        bind_engine_threads()
        return create_app(settings)

    @serve.ingress(build_app)
    class LoraplexReplica:
        """A replica; ``self.app`` (set by ``serve.ingress``) is the loraplex app."""

        @serve.multiplexed(max_num_models_per_replica=adapters_per_replica)
        async def hold(self, version: str) -> HeldAdapter:
            """Count ``version`` as this replica's (the request itself loads it, so the
            adapter cache metrics stay those of the engine)."""
            service = self.app.state.service
            adapter = await asyncio.to_thread(service.source.resolve, version)
            return HeldAdapter(self.app, adapter)

        async def forward(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
            """Serve one HTTP request (the dict ``LoraplexRouter.relay`` sends): the response start
            message, then its body messages."""
            await self.started()
            version = serve.get_multiplexed_model_id()
            if version:
                try:
                    await self.hold(version)
                except LoraplexError as exc:  # the app answers it with the right status
                    log.info("ray: %s not held: %s", version, exc.message)
            async for message in run_asgi(self.app, request):
                if message["type"] == "http.response.start":
                    message["headers"] = [
                        *message.get("headers", []),
                        (REPLICA_HEADER.encode(), replica_id().encode()),
                    ]
                yield message

        async def started(self) -> None:
            """Once the app is up (first request or health check; once): the metrics port,
            and tenant limits shared by the replicas."""
            if getattr(self, "starting", None) is None:
                self.starting = asyncio.ensure_future(self.start())
            await self.starting

        async def start(self) -> None:
            namespace = serve.get_replica_context().app_name
            self.app.state.service.limits = SharedLimits(namespace)
            try:
                self.metrics_task = await start_metrics_server(self.app, settings, replica_id())
            except (OSError, RayError) as exc:  # serving does not depend on it
                log.error("ray: this replica's metrics port did not start: %s", exc)

        async def check_health(self) -> None:
            """Ray replaces a replica whose engine died (the app answers 503 meanwhile)."""
            await self.started()
            lifecycle = self.app.state.lifecycle
            if lifecycle.engine_dead is not None:
                raise RuntimeError(f"engine dead: {lifecycle.engine_dead}")

    return LoraplexReplica


async def run_asgi(app: FastAPI, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Run ``request`` through ``app``; yield what it sends. Cancelling the iteration (the
    client left) tells the app the client disconnected."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request["method"],
        "scheme": "http",
        "path": request["path"],
        "raw_path": request["path"].encode(),
        "root_path": "",
        "query_string": request["query_string"],
        "headers": request["headers"],
        "client": tuple(request["client"]) if request.get("client") else None,
        "server": None,
    }
    body_sent = asyncio.Event()
    disconnected = asyncio.Event()
    messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def receive() -> dict[str, Any]:
        if not body_sent.is_set():
            body_sent.set()
            return {"type": "http.request", "body": request["body"], "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await messages.put(message)

    async def call() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await messages.put(None)

    task = asyncio.create_task(call())
    try:
        while (message := await messages.get()) is not None:
            yield message
        await task
    finally:
        disconnected.set()
        if not task.done():
            with suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
