"""Per-request observation: ``x-request-id``, request metrics, one JSON log line, one span.

``ObserveRequests`` is a plain ASGI middleware (it sees the end of streamed bodies, which
``call_next`` middlewares do not). For each inference request (``/v1/*``, ``/generate``) it
opens a ``RequestRecord``, keeps the client's ``x-request-id`` when it is well-formed (else
the route's id, else a new one) and returns it, and as the last body bytes go out
counts the request, observes its queue wait, logs one JSON line on ``loraplex.requests`` and
ends its trace span. The line never holds a key, and holds the prompt only with
``log_prompts`` on. Failed requests are also kept in ``RecentErrors``, and served ones in
``LiveStats``, for the web console.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections import deque
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplex.server.live_stats import LiveStats
from loraplex.server.metrics import Metrics
from loraplex.server.request_context import (
    RequestRecord,
    close_record,
    open_record,
    route_path,
)
from loraplex.server.tracing import Tracing

OBSERVED_PREFIXES = ("/v1/", "/generate")
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
"""A client's ``x-request-id`` is kept if it matches this (1-128 safe characters)."""

log = logging.getLogger("loraplex.requests")


def json_request_logger() -> None:
    """Send ``loraplex.requests`` lines to stderr as bare JSON (one object per line)."""
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class RecentErrors:
    """The last ``size`` failed requests (status >= 400), newest last."""

    def __init__(self, size: int = 50) -> None:
        self._items: deque[dict[str, Any]] = deque(maxlen=size)

    def add(self, line: dict[str, Any]) -> None:
        keep = ("request_id", "path", "status", "tenant", "model", "adapter", "error")
        self._items.append({"time": time.time(), **{k: line[k] for k in keep}})

    def items(self) -> list[dict[str, Any]]:
        return list(self._items)


class ObserveRequests:
    """ASGI middleware: request id, metrics, log line and span of each inference request."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        tracing: Tracing,
        errors: RecentErrors,
        live: LiveStats,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.tracing = tracing
        self.errors = errors
        self.live = live

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope) if scope["type"] == "http" else ""
        if not path.startswith(OBSERVED_PREFIXES):
            await self.app(scope, receive, send)
            return
        sent_id = Headers(scope=scope).get("x-request-id", "")
        client_id = sent_id if REQUEST_ID_RE.fullmatch(sent_id) else None
        record = RequestRecord(client_id or "", scope["method"], path)
        span = self.tracing.start(f"{scope['method']} {path}")
        token = open_record(record)
        done = False

        def finish() -> None:
            nonlocal done
            if not done:
                done = True
                self._finish(scope, record, span)

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                headers = MutableHeaders(scope=message)
                if client_id is not None:
                    headers["x-request-id"] = client_id
                elif "x-request-id" not in headers:
                    headers["x-request-id"] = f"req-{uuid.uuid4().hex}"
                record.request_id = headers["x-request-id"]
                record.adapter = headers.get("x-loraplex-adapter", record.adapter)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finish()  # before the last byte goes out: a client that has it can read the log
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except BaseException:
            record.status = record.status if record.status >= 400 else 500
            raise
        finally:
            finish()
            close_record(token)

    def _finish(self, scope: Scope, record: RequestRecord, span: Any) -> None:
        total = time.perf_counter() - record.started
        route = scope.get("route")
        adapter = self.metrics.adapter(record.adapter or "none")
        if route is not None:
            tenant = self.metrics.tenant(record.tenant or "none")
            self.metrics.requests.labels(route.path, tenant, adapter, str(record.status)).inc()
            if record.adapter is not None:
                self.live.record(adapter, total, record.status < 400)
        if record.queue_wait is not None:
            self.metrics.queue_wait.labels(adapter).observe(record.queue_wait)
        line = record.fields(total)
        log.info(json.dumps(line))
        if record.status >= 400:
            self.errors.add(line)
        self.tracing.end(span, line)
