"""Shared by the route tests (test_server_*.py): the request bodies they send and the checks
every response gets (OpenAI error bodies, SSE framing). Not a test module; no fixtures here.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx

BASE = "smollm2-135m"  # Settings.served_model_name's default
Serve = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]
"""The ``serve`` fixture (conftest.py): ``async with serve(**settings) as client``."""


def chat(model: str, **extra: Any) -> dict[str, Any]:
    """A one-message chat request body for ``model``."""
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], **extra}


def sse_data(response: httpx.Response) -> list[str]:
    """The data of each event; fails unless every event is one ``data: `` line + blank line."""
    assert response.headers["content-type"].startswith("text/event-stream")
    body = response.text
    assert body.endswith("\n\n"), body
    events = body.split("\n\n")[:-1]
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
    return [event.removeprefix("data: ") for event in events]


def assert_error(response: httpx.Response, status: int, code: str) -> str:
    """An OpenAI error body with exactly message, type, param and code; returns the message."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(response.json()) == {"error"}
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"] and error["type"]
    return error["message"]
