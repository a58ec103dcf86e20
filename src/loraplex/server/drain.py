"""Draining and stopping: what the server does between a stop signal (or engine death) and exit.

``Lifecycle`` holds the process's state: draining, why the engine died, the requests in
progress and the exit status. ``RequestGate`` (ASGI middleware) counts requests in progress
and refuses new ones with 503 + ``Retry-After`` while draining or once the engine is dead.
``Lifecycle.drain`` lets requests in progress finish for up to ``shutdown_timeout`` seconds,
stops the rest with a clear error, then asks the HTTP server to exit; the engine itself is
shut down only after that, by the app's lifespan. Signal handling lives in ``serve_cli``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from loraplex.server.errors import error_response
from loraplex.server.request_context import route_path

log = logging.getLogger("loraplex.server")

GATED_PREFIXES = ("/v1/", "/generate", "/admin/")
"""Paths that reach the engine or the adapter store; health, readiness and metrics stay open."""

DRAIN_RETRY_AFTER = 2.0
"""Seconds a client is told to wait before retrying (on another replica, usually)."""

ABORT_GRACE = 5.0
"""Seconds stopped requests get to send their error before the server exits anyway."""


def _noop(*_: Any) -> None:
    return None


class Lifecycle:
    """Draining, engine death, requests in progress and the exit status of one server."""

    def __init__(self, shutdown_timeout: float) -> None:
        self.shutdown_timeout = shutdown_timeout
        self.draining = False
        self.engine_dead: str | None = None
        self.active = 0
        self.exit_code = 0
        self.stop_serving: Callable[[], None] = _noop
        """Set by whoever runs the HTTP server: make it stop accepting and exit."""
        self.stop_requests: Callable[[str], None] = _noop
        """Set by the app: stop every request in progress with this message."""
        self._drain: asyncio.Task[None] | None = None

    def refusal(self) -> str | None:
        """Why a new request is refused now, or None."""
        if self.engine_dead is not None:
            return f"The inference engine stopped ({self.engine_dead}); the server is restarting."
        if self.draining:
            return "The server is shutting down and takes no new requests; retry shortly."
        return None

    def engine_died(self, reason: str) -> None:
        """Refuse requests, end those in progress (a call into a dead engine may never
        return), and exit with status 1 (unless already draining)."""
        self.engine_dead = reason
        self.stop_requests(self.refusal() or reason)
        if not self.draining:
            self.exit_code = 1
            log.error("exiting with status 1 so that a supervisor restarts the server")
            self.stop_serving()

    def begin_drain(self) -> None:
        """Start draining (idempotent); runs on the event loop."""
        if self._drain is None:
            self._drain = asyncio.ensure_future(self.drain())

    async def drain(self) -> None:
        """Refuse new requests, wait for those in progress, stop the rest, then exit."""
        self.draining = True
        loop = asyncio.get_running_loop()
        log.info(
            "shutting down: %d request(s) in progress get up to %.0f s to finish",
            self.active,
            self.shutdown_timeout,
        )
        await self._wait_idle(loop.time() + self.shutdown_timeout)
        if self.active:
            log.warning("shutdown timeout reached: stopping %d request(s)", self.active)
            self.stop_requests(
                f"The server shut down and stopped this request after its "
                f"{self.shutdown_timeout:.0f} s shutdown timeout; retry it."
            )
            await self._wait_idle(loop.time() + ABORT_GRACE)
        log.info("drained; stopping")
        self.stop_serving()

    async def _wait_idle(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while self.active and loop.time() < deadline:
            await asyncio.sleep(0.1)


class RequestGate:
    """ASGI middleware: count gated requests; 503 them while draining or after engine death."""

    def __init__(self, app: Any, lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not route_path(scope).startswith(GATED_PREFIXES):
            await self.app(scope, receive, send)
            return
        refusal = self.lifecycle.refusal()
        if refusal is not None:
            response = error_response(
                503, refusal, "server_error", "unavailable", retry_after=DRAIN_RETRY_AFTER
            )
            await response(scope, receive, send)
            return
        self.lifecycle.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.active -= 1
