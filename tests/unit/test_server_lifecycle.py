"""Process lifecycle logic: stall tracking, the engine watch, draining and its gate, request
deadlines, and a dead engine being a 503 (never a 409 or a fallback). The real signals, engine
and processes are in tests/integration/test_lifecycle.py."""

from __future__ import annotations

import asyncio
import gc
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import uvicorn
from route_checks import BASE, assert_error
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from loraplex.adapters import ResolvedAdapter
from loraplex.config import Settings
from loraplex.errors import IncompatibleAdapter, Unavailable
from loraplex.server import app as app_module
from loraplex.server.app import freeze_startup_heap
from loraplex.server.drain import Lifecycle, RequestGate
from loraplex.server.liveness import ProgressTracker, watch_engine
from loraplex.server.metrics import Metrics
from loraplex.server.serve_cli import draining_server
from loraplex.server.service import Service
from loraplex.server.usage import UsageRecorder

if TYPE_CHECKING:
    from fake_engine import FakeEngine
    from route_checks import Serve

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_stall_counts_only_while_requests_wait() -> None:
    clock = Clock()
    tracker = ProgressTracker(clock)
    clock.now += 50  # idle: no request waits, so no stall
    assert tracker.stalled_for() == 0
    tracker.started()  # an idle engine's clock starts with its first request
    clock.now += 4
    assert tracker.stalled_for() == 4
    tracker.progressed()
    clock.now += 1
    assert tracker.stalled_for() == 1
    tracker.started()
    clock.now += 7
    assert tracker.stalled_for() == 8  # a second request does not reset the clock
    tracker.finished()
    assert tracker.stalled_for() == 0 and tracker.waiting == 1
    tracker.finished()
    clock.now += 30
    assert tracker.stalled_for() == 0 and tracker.waiting == 0


async def test_watch_reports_engine_death_once(engine: FakeEngine) -> None:
    deaths: list[str] = []
    watch = asyncio.create_task(watch_engine(engine, deaths.append, interval=0.01))
    await asyncio.sleep(0.05)
    assert deaths == []
    engine.health_error = Unavailable("engine core exited")
    await asyncio.wait_for(watch, 5)
    assert deaths == ["engine core exited"]


def gated_app(lifecycle: Lifecycle, release: asyncio.Event) -> Starlette:
    async def slow(_: object) -> PlainTextResponse:
        await release.wait()
        return PlainTextResponse("done")

    async def health(_: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/v1/slow", slow), Route("/health", health)])
    app.add_middleware(RequestGate, lifecycle=lifecycle)
    return app


async def test_drain_refuses_new_requests_and_waits_for_those_in_progress() -> None:
    lifecycle, release = Lifecycle(shutdown_timeout=30), asyncio.Event()
    stopped: list[str] = []
    lifecycle.stop_serving = lambda: stopped.append("serving")
    lifecycle.stop_requests = stopped.append
    transport = httpx.ASGITransport(gated_app(lifecycle, release))
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
        in_progress = asyncio.create_task(client.get("/v1/slow"))
        while lifecycle.active == 0:
            await asyncio.sleep(0.01)
        lifecycle.begin_drain()
        await asyncio.sleep(0.05)
        refused = await client.get("/v1/slow")
        assert "shutting down" in assert_error(refused, 503, "unavailable")
        assert refused.headers["retry-after"] == "2"
        assert (await client.get("/health")).status_code == 200  # alive while draining
        assert stopped == []
        release.set()
        assert (await in_progress).text == "done"
        await asyncio.wait_for(lifecycle._drain, 5)  # type: ignore[arg-type]
    assert stopped == ["serving"] and lifecycle.exit_code == 0


async def test_drain_stops_what_outlives_the_shutdown_timeout() -> None:
    lifecycle, release = Lifecycle(shutdown_timeout=0.1), asyncio.Event()
    stopped: list[str] = []
    lifecycle.stop_serving = lambda: stopped.append("serving")

    def stop_requests(reason: str) -> None:
        stopped.append(reason)
        release.set()  # what Service.stop_all does to the requests in progress

    lifecycle.stop_requests = stop_requests
    transport = httpx.ASGITransport(gated_app(lifecycle, release))
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
        in_progress = asyncio.create_task(client.get("/v1/slow"))
        while lifecycle.active == 0:
            await asyncio.sleep(0.01)
        await lifecycle.drain()
        await in_progress
    assert "shutdown timeout" in stopped[0] and stopped[1:] == ["serving"]


@pytest.mark.parametrize("root_path", ["", "/direct"])  # behind a proxy's prefix too
async def test_engine_death_refuses_requests_and_exits_1(root_path: str) -> None:
    lifecycle = Lifecycle(shutdown_timeout=30)
    stopped: list[str] = []
    lifecycle.stop_serving = lambda: stopped.append("serving")
    lifecycle.stop_requests = stopped.append
    transport = httpx.ASGITransport(gated_app(lifecycle, asyncio.Event()), root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
        lifecycle.engine_died("engine core exited")
        message = assert_error(await client.get(root_path + "/v1/slow"), 503, "unavailable")
    assert "engine core exited" in message
    assert lifecycle.exit_code == 1 and stopped == [message, "serving"]


async def test_health_is_503_while_requests_wait_on_a_stalled_engine(
    serve: Serve, engine: FakeEngine
) -> None:
    engine.gate = asyncio.Event()  # the engine produces nothing until set
    async with serve(stall_seconds=0.2) as client:
        assert (await client.get("/health")).status_code == 200  # idle is not stalled
        body = {"model": BASE, "prompt": "Hi", "max_tokens": 2}
        waiting = asyncio.create_task(client.post("/v1/completions", json=body))
        await asyncio.sleep(0.4)
        assert "stalled" in assert_error(await client.get("/health"), 503, "unavailable")
        assert "stalled" in assert_error(await client.get("/ready"), 503, "unavailable")
        engine.gate.set()
        assert (await waiting).status_code == 200
        assert (await client.get("/health")).status_code == 200


async def test_request_deadline_is_504(serve: Serve, engine: FakeEngine) -> None:
    engine.gate = asyncio.Event()
    async with serve(request_timeout_seconds=0.2) as client:
        body = {"model": BASE, "prompt": "Hi", "max_tokens": 2}
        plain = await client.post("/v1/completions", json=body)
        assert "deadline" in assert_error(plain, 504, "deadline_exceeded")
        streamed = await client.post("/v1/completions", json={**body, "stream": True})
    assert streamed.status_code == 200
    assert '"code": "deadline_exceeded"' in streamed.text


async def test_stop_all_ends_generations_in_progress_with_503(
    serve: Serve, engine: FakeEngine
) -> None:
    engine.gate = asyncio.Event()
    async with serve() as client:
        body = {"model": BASE, "prompt": "Hi", "max_tokens": 2}
        waiting = asyncio.create_task(client.post("/v1/completions", json=body))
        while not engine.generations:
            await asyncio.sleep(0.01)
        service = client._transport.app.state.service  # type: ignore[attr-defined]
        service.stop_all("The server shut down and stopped this request.")
        message = assert_error(await waiting, 503, "unavailable")
        assert message == "The server shut down and stopped this request."
        later = await client.post("/v1/completions", json=body)
        assert assert_error(later, 503, "unavailable") == message


async def test_dead_engine_is_503_not_409_even_with_fallback(
    serve: Serve, engine: FakeEngine
) -> None:
    engine.load_errors["sales"] = IncompatibleAdapter("add_lora failed: engine dead")
    engine.health_error = Unavailable("The inference engine stopped.")
    async with serve() as client:
        body = {"model": "sales", "prompt": "Hi", "max_tokens": 2}
        response = await client.post("/v1/completions", json=body)
    assert assert_error(response, 503, "unavailable") == "The inference engine stopped."


class DeadEngine:
    async def load(self, adapter: ResolvedAdapter) -> bool:
        raise IncompatibleAdapter("add_lora failed")

    async def check_health(self) -> None:
        raise Unavailable("The inference engine stopped.")


async def test_dead_engine_is_never_a_reason_to_fall_back() -> None:
    metrics = Metrics()
    service = Service(Settings(), DeadEngine(), None, None, metrics, UsageRecorder(None, 1))  # type: ignore[arg-type]
    allowed = ResolvedAdapter("sales", "sales@v1", Path("/nowhere"), fallback_to_base=True)
    with pytest.raises(Unavailable, match="engine stopped"):
        await service.target(allowed)
    assert metrics.fallbacks.labels("sales")._value.get() == 0


async def test_first_stop_signal_drains_and_is_not_reraised_at_exit() -> None:
    lifecycle = Lifecycle(shutdown_timeout=30)
    server = draining_server(uvicorn.Config(app=gated_app(lifecycle, asyncio.Event())), lifecycle)
    server.started = True
    server.loop = asyncio.get_running_loop()  # type: ignore[attr-defined]
    server.handle_exit(signal.SIGTERM, None)
    await asyncio.sleep(0.05)
    assert lifecycle.draining and not server.should_exit
    server.handle_exit(signal.SIGINT, None)  # a second Ctrl-C: stop now
    assert server.should_exit and not server.force_exit
    server.handle_exit(signal.SIGINT, None)
    assert server.force_exit
    assert server._captured_signals == []  # uvicorn would re-raise these at exit (status != 0)
    lifecycle._drain.cancel()  # type: ignore[union-attr]


# ---- the startup heap, frozen once the server is up


async def test_the_startup_heap_is_frozen_before_the_server_is_ready(
    serve: Serve, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    frozen_with_engine_running = []
    monkeypatch.setattr(
        app_module,
        "freeze_startup_heap",
        lambda: frozen_with_engine_running.append(not engine.stopped),
    )
    async with serve() as client:
        assert frozen_with_engine_running == [True]
        assert (await client.get("/ready")).status_code == 200
    assert frozen_with_engine_running == [True]


def test_a_frozen_heap_is_left_out_of_collections() -> None:
    startup_object: list[object] = []
    startup_object.append(startup_object)  # a cycle: only the collector could free it
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 0
        assert not any(o is startup_object for o in gc.get_objects())
        assert gc.is_tracked(startup_object)
    finally:
        gc.unfreeze()
    assert any(o is startup_object for o in gc.get_objects())
