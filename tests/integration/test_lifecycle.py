"""Process lifecycle under real signals: a stopped engine fails liveness and recovers, a dead
engine is 503 everywhere and the server exits 1, SIGTERM / Ctrl-C drain and exit 0, a client
that disconnects stops its engine request, and every request has a deadline.

Each test runs a ``Bystander`` beside the fault. The engine is vLLM's EngineCore child process
of the server, found with psutil and signalled directly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import pytest

from loraplex.testing.bystander import Bystander
from loraplex.testing.launcher import RunningServer, loraplex_server, server_env

pytestmark = pytest.mark.integration

BASE = "smollm2-135m"
STALL_SECONDS = 3
REQUEST_TIMEOUT = 20
SHUTDOWN_TIMEOUT = 15
LONG = 2000
"""max_tokens of a request that runs far longer than any wait here (ignore_eos: all of them)."""


def start(tmp: Path, base_model_dir: Path, adapters_dir: Path, **settings: object):
    env = server_env(tmp, base_model_dir, adapters_dir=adapters_dir, **settings)
    return loraplex_server(tmp / "server.log", env=env)


def engine_process(server: RunningServer) -> psutil.Process:
    """The vLLM EngineCore process under the server."""
    for child in psutil.Process(server.process.pid).children(recursive=True):
        if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
            return child
    raise AssertionError("no EngineCore process under the server")


def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        time.sleep(0.25)


def metric(server: RunningServer, name: str, label: str = "") -> float:
    """Sum of the samples of ``name`` whose labels contain ``label``."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    pattern = re.compile(rf"^{name}(\{{[^}}]*\}})? (\S+)$", re.M)
    return sum(float(v) for labels, v in pattern.findall(text) if label in labels)


def long_body(model: str, stream: bool, max_tokens: int = LONG) -> dict:
    return {
        "model": model,
        "prompt": "Tell me a long story.",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def raw_post(server: RunningServer, path: str, body: dict) -> socket.socket:
    """A request sent over a plain socket, so that the test can drop the connection."""
    url = urlsplit(server.url)
    sock = socket.create_connection((url.hostname, url.port))
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def sse_events(response: httpx.Response) -> Iterator[dict | str]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            yield data if data == "[DONE]" else json.loads(data)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path, adapters_dir: Path
) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("lifecycle")
    with start(
        home,
        base_model_dir,
        adapters_dir,
        stall_seconds=STALL_SECONDS,
        request_timeout_seconds=REQUEST_TIMEOUT,
    ) as running:
        yield running


def test_the_model_runs_in_the_engine_core_process(server: RunningServer) -> None:
    """``cpu_worker`` auto on CPU (no core binding asked for): vLLM runs the model inside its
    engine-core process, with no worker process of its own under it, forked from the server."""
    engine = engine_process(server)
    workers = [" ".join(child.cmdline()) for child in engine.children(recursive=True)]
    assert workers == [], f"the engine core has worker processes: {workers}"
    log = server.log_path.read_text(errors="replace")
    assert "forking the engine core from the server process" in log  # not spawned
    assert "OpenMP thread binding info" not in log, "vLLM bound a worker process's threads"
    body = {"model": BASE, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=REQUEST_TIMEOUT)
    assert response.status_code == 200, response.text


def test_stopped_engine_fails_liveness_then_recovers(server: RunningServer) -> None:
    engine = engine_process(server)
    with Bystander(server.url, [BASE, "pirate"]) as bystander:
        wait_for(lambda: bystander.sent >= 3, 120, "bystander warmed up")
        engine.suspend()  # SIGSTOP
        try:
            stopped = time.monotonic()
            wait_for(
                lambda: httpx.get(server.url + "/health", timeout=5).status_code == 503,
                15,
                "/health 503 after SIGSTOP",
            )
            health = httpx.get(server.url + "/health", timeout=5)
            assert health.status_code == 503
            assert "stalled" in health.json()["error"]["message"]
            assert time.monotonic() - stopped < 15
        finally:
            engine.resume()  # SIGCONT
        wait_for(
            lambda: httpx.get(server.url + "/health", timeout=5).status_code == 200,
            60,
            "/health 200 after SIGCONT",
        )
        sent = bystander.sent
        wait_for(lambda: bystander.sent >= sent + 3, 120, "bystander served again")
    bystander.assert_clean()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_disconnect_aborts_the_engine_request(server: RunningServer, stream: bool) -> None:
    with Bystander(server.url, [BASE, "pirate"]) as bystander:
        before = metric(server, "loraplex_completion_tokens_total", "shout")
        socks = [raw_post(server, "/v1/completions", long_body("shout", stream)) for _ in range(2)]
        wait_for(
            lambda: metric(server, "loraplex_completion_tokens_total", "shout") > before + 20,
            120,
            "the long requests generate",
        )
        assert metric(server, "loraplex_engine_requests") >= 2
        # The bystander's thread may not have been scheduled yet on a loaded machine: wait for
        # it to be served beside the long requests, then again once they are dropped.
        wait_for(lambda: bystander.sent >= 2, 120, "bystander served beside the long requests")
        for sock in socks:
            sock.close()
        sent = bystander.sent
        wait_for(lambda: bystander.sent >= sent + 2, 120, "bystander served after the drop")
    bystander.assert_clean()
    # Left alone, each would run LONG tokens (tens of seconds here); aborted, the engine holds
    # nothing once the bystander has stopped.
    wait_for(lambda: metric(server, "loraplex_engine_requests") == 0, 10, "engine idle")


def test_request_deadline(server: RunningServer) -> None:
    results: dict[str, object] = {}

    def stream() -> None:
        with httpx.stream(
            "POST", server.url + "/v1/completions", json=long_body(BASE, True), timeout=120
        ) as response:
            results["stream"] = [e for e in sse_events(response) if isinstance(e, dict)][-1]

    with Bystander(server.url, [BASE, "pirate"]) as bystander:
        streamer = threading.Thread(target=stream)
        streamer.start()
        started = time.monotonic()
        plain = httpx.post(server.url + "/v1/completions", json=long_body(BASE, False), timeout=120)
        streamer.join(120)
    bystander.assert_clean()
    assert plain.status_code == 504, plain.text
    error = plain.json()["error"]
    assert error["code"] == "deadline_exceeded" and "deadline" in error["message"]
    assert time.monotonic() - started >= REQUEST_TIMEOUT
    assert results["stream"]["error"]["code"] == "deadline_exceeded"  # type: ignore[index]


def test_dead_engine_is_503_everywhere_and_the_server_exits_1(
    tmp_path: Path, base_model_dir: Path, adapters_dir: Path
) -> None:
    statuses: list[tuple[int, str, dict]] = []
    with (
        start(tmp_path, base_model_dir, adapters_dir) as server,
        Bystander(server.url, [BASE, "pirate"]) as bystander,
    ):
        wait_for(lambda: bystander.sent >= 3, 120, "bystander warmed up")
        engine_process(server).kill()  # SIGKILL
        # Cold adapters (their load reaches the dead engine), a warm one, and the base model,
        # until the server has gone.
        models = ["random1", "random2", "shout", "pirate", BASE]
        while server.process.poll() is None and len(statuses) < 500:
            model = models[len(statuses) % len(models)]
            body = {"model": model, "prompt": "Hi", "max_tokens": 2}
            try:
                response = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
            except httpx.HTTPError:
                continue
            statuses.append((response.status_code, response.text, dict(response.headers)))
        assert server.process.wait(60) == 1
    assert statuses, "no request was answered between the engine's death and the exit"
    for status, text, headers in statuses:
        assert status == 503, f"{text}\n{server.log_tail(80)}"
        assert "engine" in json.loads(text)["error"]["message"]
        assert "x-loraplex-fallback" not in headers
    # The bystander may lose the request in flight when the engine died and those sent until
    # the process exited: 503 from the server, or no connection once it is gone.
    for failure in bystander.failures:
        assert ": 503 " in failure or "Error" in failure, failure
    assert "exiting with status 1" in server.log_tail(200)


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_stop_signal_drains_then_exits_0(
    tmp_path: Path, base_model_dir: Path, adapters_dir: Path, how: str
) -> None:
    results: dict[str, list] = {}

    def stream(name: str, max_tokens: int, ready: threading.Event) -> None:
        body = long_body("pirate", True, max_tokens)
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
            events = []
            for event in sse_events(r):
                events.append(event)
                ready.set()
            results[name] = events

    with start(tmp_path, base_model_dir, adapters_dir, shutdown_timeout=SHUTDOWN_TIMEOUT) as server:
        with Bystander(server.url, [BASE, "pirate"]) as bystander:
            wait_for(lambda: bystander.sent >= 3, 120, "bystander warmed up")
            short_ready, long_ready = threading.Event(), threading.Event()
            streams = [
                threading.Thread(target=stream, args=("short", 60, short_ready)),
                threading.Thread(target=stream, args=("long", LONG, long_ready)),
            ]
            for thread in streams:
                thread.start()
            assert short_ready.wait(120) and long_ready.wait(120)
            # The engine's processes live in their own process group: a Ctrl-C (or a
            # process-group SIGTERM) reaches the server alone, which drains before stopping them.
            assert os.getpgid(engine_process(server).pid) != os.getpgid(server.process.pid)
            bystander.last_request()
            # Its last request may have been on its way when it was told to stop; the server
            # would rightly refuse it as new if it arrived after the signal. Signal once that
            # request is generating beside the two streams, or has ended.
            wait_for(
                lambda: bystander.stopped or metric(server, "loraplex_requests_in_flight") >= 3,
                120,
                "the bystander's last request reached the server",
            )
            if how == "sigterm":
                os.kill(server.process.pid, signal.SIGTERM)
            else:  # a terminal's Ctrl-C: SIGINT to the whole process group, engine included
                os.killpg(server.process.pid, signal.SIGINT)
            wait_for(
                lambda: httpx.get(server.url + "/ready", timeout=5).status_code == 503,
                5,
                "/ready 503 while draining",
            )
            refused = httpx.post(
                server.url + "/v1/completions", json=long_body(BASE, False, 4), timeout=30
            )
            assert refused.status_code == 503
            assert "shutting down" in refused.json()["error"]["message"]
            assert int(refused.headers["retry-after"]) >= 1
            assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        bystander.assert_clean()  # its request in flight at the signal finished
        for thread in streams:
            thread.join(SHUTDOWN_TIMEOUT + 30)
        assert server.process.wait(SHUTDOWN_TIMEOUT + 30) == 0
    short = results["short"]
    assert short[-1] == "[DONE]" and short[-2]["choices"][0]["finish_reason"] == "length"
    long = results["long"]
    assert long[-1] == "[DONE]"
    error = long[-2]["error"]
    assert error["code"] == "unavailable" and "shutdown timeout" in error["message"]
