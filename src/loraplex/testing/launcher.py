"""Start a server as a child process and wait until it is ready (tests and benchmarks).

Works for ``loraplex serve`` and for vLLM's own OpenAI server, so both can be measured the
same way. The process gets its own process group, so stopping it ends the engine workers too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    """A started server: its base URL, process and log file."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    startup_seconds: float = 0.0

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log, for error messages."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def wait_ready(server: RunningServer, ready_path: str, timeout: float) -> None:
    """Poll ``ready_path`` until it answers 200; raise with the log tail if the server dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"server exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        try:
            if httpx.get(server.url + ready_path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"server not ready after {timeout:.0f}s:\n{server.log_tail()}")


def stop(server: RunningServer, grace: float = 20) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left after ``grace`` s."""
    if server.process.poll() is not None:
        return
    os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()


@contextmanager
def running_server(
    command: Sequence[str],
    port: int,
    log_path: Path,
    env: dict[str, str] | None = None,
    ready_path: str = "/ready",
    timeout: float = 600,
) -> Iterator[RunningServer]:
    """Run ``command`` (which must listen on ``port``) until the ``with`` block ends."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path)
    started = time.monotonic()
    try:
        wait_ready(server, ready_path, timeout)
        server.startup_seconds = time.monotonic() - started
        yield server
    finally:
        stop(server)
