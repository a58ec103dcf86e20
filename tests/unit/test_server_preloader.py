"""The preloader keeps beating while it warms a version: ``promote --preload`` waits only for
servers whose heartbeat is recent, so a slow warm-up must not make a server look dead."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from loraplex.registry.rollout import Preload
from loraplex.server.preloader import Preloader

pytestmark = pytest.mark.anyio


class FakeRollout:
    """Beats, one pending intent, and the acks, in memory."""

    def __init__(self) -> None:
        self.beats = 0
        self.acks: list[tuple[int, str | None]] = []
        self._pending = [Preload(7, "sales", 2)]

    def heartbeat(self, server_id: str, host: str) -> None:
        self.beats += 1

    def pending(self, server_id: str, since: Any) -> list[Preload]:
        pending, self._pending = self._pending, []
        return pending

    def ack(self, preload_id: int, server_id: str, error: str | None) -> None:
        self.acks.append((preload_id, error))

    def leave(self, server_id: str) -> None:
        pass


class SlowService:
    """``target`` (the engine load of a warm-up) waits until ``loaded`` is set."""

    def __init__(self) -> None:
        self.warming = asyncio.Event()
        self.loaded = asyncio.Event()

    async def resolve_source(self, key: str) -> str:
        return key

    async def target(self, adapter: Any) -> Any:
        self.warming.set()
        await self.loaded.wait()
        return SimpleNamespace(fallback=False)


async def until(condition: Any) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), 30)


async def test_heartbeats_go_on_while_a_version_warms() -> None:
    source = SimpleNamespace(
        registry=SimpleNamespace(catalog=SimpleNamespace(engine=None)),
        watch=threading.Event,
    )
    service = SlowService()
    preloader = Preloader(service, source, heartbeat_seconds=0.01)  # type: ignore[arg-type]
    rollout = preloader.rollout = FakeRollout()  # type: ignore[assignment]
    running = asyncio.create_task(preloader.run())
    try:
        await asyncio.wait_for(service.warming.wait(), 30)
        beats = rollout.beats
        await until(lambda: rollout.beats >= beats + 3)  # the warm-up is still waiting
        assert rollout.acks == []
        service.loaded.set()
        await until(lambda: rollout.acks == [(7, None)])
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
