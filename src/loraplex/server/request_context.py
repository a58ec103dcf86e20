"""What the server learns about one HTTP request while serving it (``RequestRecord``).

The ``ObserveRequests`` middleware (request_log.py) opens a record per request in a context
variable; auth, the service and the error handler fill it in through ``current()`` (a no-op
outside a request), and the middleware turns it into the request's metrics, its JSON log line
and its trace span when the response has been sent. Never holds an API key.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any


def route_path(scope: dict[str, Any]) -> str:
    """The path the app routes on: ASGI's ``path`` less the ``root_path`` the app is mounted
    at (a proxy's prefix, e.g. a Ray Serve ``route_prefix``)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root + "/") else path


@dataclass
class RequestRecord:
    """One request as observed; times in seconds (``time.perf_counter`` based)."""

    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    tenant: str | None = None
    model: str | None = None  # what the client asked for
    adapter: str | None = None  # what served it: N@vK or the base model's name
    status: int = 0
    fallback: bool = False
    load_tier: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_wait: float | None = None
    ttft: float | None = None
    error: str | None = None
    prompt: str | None = None  # kept only when log_prompts is on

    def first_token(self) -> None:
        """Note the first token of the request (the earliest over its choices)."""
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.started

    def fields(self, total: float) -> dict[str, Any]:
        """The JSON log line's fields."""
        line = {
            "event": "request",
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "tenant": self.tenant,
            "model": self.model,
            "adapter": self.adapter,
            "fallback": self.fallback,
            "load_tier": self.load_tier,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "queue_wait_s": _rounded(self.queue_wait),
            "ttft_s": _rounded(self.ttft),
            "total_s": _rounded(total),
            "error": self.error,
        }
        if self.prompt is not None:
            line["prompt"] = self.prompt
        return line


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 6)


_current: ContextVar[RequestRecord | None] = ContextVar("loraplex_request", default=None)


def current() -> RequestRecord | None:
    """The record of the request being served, or None outside one."""
    return _current.get()


def open_record(record: RequestRecord) -> object:
    """Make ``record`` current; returns a token for ``close_record``."""
    return _current.set(record)


def close_record(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]
