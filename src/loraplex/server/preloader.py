"""A registry-backed server's part in rollouts: heartbeat, and warm what ``promote --preload``
asks for before the alias moves.

Runs as one task beside the server. Every ``heartbeat_seconds`` it records the server as alive
(``Rollout.heartbeat``), however long a warm-up takes; whenever the registry's generation
counter moves (the adapter source's watcher says so) it reads the preload intents made since
this server started that it has not answered, loads each version into the engine
(``Service.target``, as a request would) and acknowledges it with the outcome. Registry errors
are logged and retried at the next beat; they never stop the server. Serving a request does
not depend on this task.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from contextlib import suppress
from datetime import UTC, datetime

from loraplex.adapter_sources import RegistryAdapterSource
from loraplex.adapters import version_key
from loraplex.errors import LoraplexError
from loraplex.registry.rollout import Preload, Rollout
from loraplex.server.service import Service

log = logging.getLogger("loraplex.rollout")


class Preloader:
    """Heartbeat and preload acknowledgements of one server."""

    def __init__(
        self, service: Service, source: RegistryAdapterSource, heartbeat_seconds: float
    ) -> None:
        self.service = service
        self.source = source
        self.rollout = Rollout(source.registry.catalog.engine)
        self.heartbeat_seconds = heartbeat_seconds
        self.server_id = uuid.uuid4().hex[:12]
        self.host = f"{socket.gethostname()} pid {os.getpid()}"
        self.started = datetime.now(UTC)

    async def run(self) -> None:
        """Beat and answer preload intents until cancelled."""
        try:
            async with asyncio.TaskGroup() as group:  # one failing stops the other
                group.create_task(self._beat())
                group.create_task(self._answer())
        finally:
            with suppress(Exception):
                await asyncio.wait_for(asyncio.to_thread(self.rollout.leave, self.server_id), 2)

    async def _beat(self) -> None:
        """Record this server as alive every ``heartbeat_seconds``, on a loop of its own: a
        warm-up that takes longer than ``promote --preload``'s liveness window (a slow fetch
        or load) must not make the server look dead while the promote waits for its ack."""
        while True:
            await self._guarded(self.rollout.heartbeat, self.server_id, self.host)
            await asyncio.sleep(self.heartbeat_seconds)

    async def _answer(self) -> None:
        """Warm and acknowledge each preload intent, whenever the generation moves."""
        changed = self.source.watch()
        changed.set()  # look once at start
        while True:
            if changed.is_set():
                changed.clear()
                pending = await self._guarded(self.rollout.pending, self.server_id, self.started)
                if pending is None:
                    changed.set()  # retry at the next turn
                for preload in pending or []:
                    await self._warm(preload)
            await asyncio.sleep(0.05)

    async def _warm(self, preload: Preload) -> None:
        """Load ``preload``'s version into the engine and acknowledge the outcome."""
        key = version_key(preload.name, preload.number)
        error: str | None = None
        try:
            adapter = await self.service.resolve_source(key)
            target = await self.service.target(adapter)
            if target.fallback:
                error = f"{key} could not be loaded (the server would fall back to the base)"
        except LoraplexError as exc:
            error = exc.message
        log.info("preload %s: %s", key, error or "warm")
        await self._guarded(self.rollout.ack, preload.id, self.server_id, error)

    async def _guarded(self, fn, *args):  # type: ignore[no-untyped-def]
        """``fn(*args)`` in a thread; None (logged) if the registry fails."""
        try:
            return await asyncio.to_thread(fn, *args)
        except Exception as exc:  # noqa: BLE001 - the registry may be down; keep serving
            log.warning("rollout bookkeeping failed: %s", exc)
            return None
