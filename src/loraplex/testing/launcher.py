"""Start a server as a child process and wait until it is ready (tests and benchmarks).

``loraplex_server`` runs ``loraplex serve --port 0``: the server binds a free port before it
loads the engine and prints it, so no other process can take the port meanwhile. Servers that
cannot announce their port (vLLM's own, moto) get a ``reserved_port``: a free port this
process keeps bound until the server listens on it. The child gets its own process group, so
stopping it ends the engine workers too.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ANNOUNCEMENT = re.compile(r"loraplex listening on (http://\S+)")
"""The line ``loraplex serve`` prints once its port is bound."""


@contextmanager
def reserved_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A free port, held until the block ends by a bound (not listening) socket.

    Both sockets set SO_REUSEADDR, so a server started in the block (vLLM's, moto) can bind and
    listen on it, while ephemeral binds elsewhere (vLLM's own workers) skip it.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        yield sock.getsockname()[1]


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

    def check_alive(self) -> None:
        """Raise with the log tail if the process has exited."""
        if self.process.poll() is not None:
            raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")


def wait_announced_url(server: RunningServer, deadline: float) -> str:
    """The URL ``loraplex serve`` printed after binding its port."""
    while time.monotonic() < deadline:
        server.check_alive()
        found = ANNOUNCEMENT.search(server.log_path.read_text(errors="replace"))
        if found:
            return found.group(1)
        time.sleep(0.2)
    raise TimeoutError(f"server announced no port:\n{server.log_tail()}")


def wait_ready(server: RunningServer, ready_path: str, deadline: float) -> None:
    """Poll ``ready_path`` until it answers 200; raise with the log tail if the server dies."""
    while time.monotonic() < deadline:
        server.check_alive()
        try:
            if httpx.get(server.url + ready_path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"server not ready:\n{server.log_tail()}")


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
    log_path: Path,
    url: str | None = None,
    env: dict[str, str] | None = None,
    ready_path: str = "/ready",
    timeout: float = 600,
) -> Iterator[RunningServer]:
    """Run ``command`` until the ``with`` block ends, once ``ready_path`` answers 200.

    ``url`` is where the server listens; None means the server announces it (``loraplex
    serve --port 0``).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    server = RunningServer(url or "", process, log_path)
    started = time.monotonic()
    deadline = started + timeout
    try:
        server.url = url or wait_announced_url(server, deadline)
        wait_ready(server, ready_path, deadline)
        server.startup_seconds = time.monotonic() - started
        yield server
    finally:
        stop(server)


TEST_BASE_NAME = "smollm2-135m"
"""The name test servers give the bundled base model."""


def server_env(home: Path, base_model_dir: Path, **settings: object) -> dict[str, str]:
    """Environment of a test server: fp32 (greedy tokens batched == solo), a small KV cache,
    rank 16, auth off, eager (no torch.compile: a minute less to start on CPU; pass
    ``enforce_eager=False`` for the compiled path serve uses), then ``settings``
    (``field=value`` of ``Settings``) as ``LORAPLEX_FIELD``."""
    defaults: dict[str, object] = {
        "home": home,
        "base_model": base_model_dir,
        "dtype": "float32",
        "kv_cache_gib": 1,
        "max_lora_rank": 16,
        "auth": "off",
        "served_model_name": TEST_BASE_NAME,
        "enforce_eager": True,
    }
    env = {f"LORAPLEX_{k.upper()}": str(v) for k, v in {**defaults, **settings}.items()}
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "2")
    return env


def loraplex_server(
    log_path: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> AbstractContextManager[RunningServer]:
    """``loraplex serve --port 0`` (settings from ``env``) until the ``with`` block ends."""
    command = [sys.executable, "-m", "loraplex.cli", "serve", "--host", "127.0.0.1", "--port", "0"]
    return running_server(command, log_path, env=env, timeout=timeout)
