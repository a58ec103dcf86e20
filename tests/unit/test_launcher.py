"""The test/bench launcher: announced ports, reserved ports, readiness, stopping."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from loraplex.testing.launcher import reserved_port, running_server

ANNOUNCING_SERVER = """
import http.server, socketserver
server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
print(f"loraplex listening on http://127.0.0.1:{server.server_port}", flush=True)
server.serve_forever()
"""


def test_running_server_reads_the_announced_url(tmp_path: Path) -> None:
    command = [sys.executable, "-c", ANNOUNCING_SERVER]
    with running_server(command, tmp_path / "log", ready_path="/", timeout=60) as server:
        assert server.url.startswith("http://127.0.0.1:")
        assert httpx.get(server.url + "/").status_code == 200
    assert server.process.poll() is not None


def test_a_reserved_port_can_be_served(tmp_path: Path) -> None:
    with reserved_port() as port:
        command = [sys.executable, "-m", "http.server", "-b", "127.0.0.1", str(port)]
        url = f"http://127.0.0.1:{port}"
        with running_server(command, tmp_path / "log", url=url, ready_path="/", timeout=60):
            assert httpx.get(url + "/").status_code == 200


def test_a_server_that_dies_is_reported_with_its_log(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "print('cannot start: bad config'); raise SystemExit(3)"]
    with (
        pytest.raises(RuntimeError, match="exited with 3(.|\n)*bad config"),
        running_server(command, tmp_path / "log", timeout=60),
    ):
        pass
