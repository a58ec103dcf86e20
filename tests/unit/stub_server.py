"""A tiny real OpenAI-style HTTP server (uvicorn in a thread) for client and bench tests.

It needs no model: the model name picks the behaviour, so tests can provoke what the real
server only does under load (429, 503) or on broken adapters:
``flaky429`` answers 429 (Retry-After 0) twice then succeeds, ``flaky503`` 503 twice then
succeeds, ``down`` always 503, ``boom`` 500, ``incompatible`` 409 adapter_incompatible,
``missing`` 404, ``theirs`` 403, ``bad`` 400, ``limited`` 429 with Retry-After 3600; anything
else succeeds with "hello from <model>", streamed token by token when asked. ``/v1/models``
shows each tenant key (``KEYS``) only its adapters.
Not a test module: tests get a running stub from the ``stub`` fixture (conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

BASE = "stub-base"
ADAPTERS = ["a1", "a2", "a3", "flaky429", "down"]
KEYS = {"key0": ["a1", "a2"], "key1": ["a3"]}
"""Tenant keys and the adapters each may see in /v1/models (no key: all of them)."""
FAILURES = {
    "flaky429": (429, "rate_limit_error", "rate_limited", 2, "0"),
    "flaky503": (503, "server_error", "unavailable", 2, None),
    "down": (503, "server_error", "unavailable", None, None),
    "boom": (500, "server_error", "internal_error", None, None),
    "incompatible": (409, "invalid_request_error", "adapter_incompatible", None, None),
    "missing": (404, "invalid_request_error", "model_not_found", None, None),
    "theirs": (403, "permission_error", "forbidden", None, None),
    "bad": (400, "invalid_request_error", "invalid_request", None, None),
    "limited": (429, "rate_limit_error", "rate_limited", None, "3600"),
}


def make_app() -> FastAPI:
    """The stub app; ``app.state.calls`` counts requests per model name."""
    app = FastAPI()
    app.state.calls = Counter()
    app.state.bodies = []
    app.state.keys = []
    hits = {"n": 0}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        key = request.headers.get("authorization", "")
        visible = KEYS.get(key.removeprefix("Bearer "), ADAPTERS)
        data = [{"id": BASE, "object": "model", "parent": None}]
        data += [{"id": a, "object": "model", "parent": BASE} for a in visible]
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = (
            "# TYPE loraplex_adapter_cache_hits_total counter\n"
            f'loraplex_adapter_cache_hits_total{{tier="gpu"}} {hits["n"]}\n'
            "# TYPE loraplex_adapter_cache_misses_total counter\n"
            "loraplex_adapter_cache_misses_total 1\n"
        )
        return PlainTextResponse(text)

    async def complete(request: Request, chat: bool):
        body = await request.json()
        model = body["model"]
        app.state.calls[model] += 1
        app.state.bodies.append(body)
        app.state.keys.append((model, request.headers.get("authorization")))
        if model in FAILURES:
            status, etype, code, times, retry_after = FAILURES[model]
            if times is None or app.state.calls[model] <= times:
                headers = {"retry-after": retry_after} if retry_after else {}
                error = {"message": f"stub {status} for {model}", "type": etype, "code": code}
                return JSONResponse({"error": error}, status_code=status, headers=headers)
        if model != BASE:
            hits["n"] += 1
        words = ["hello", " from", f" {model}"][: body.get("max_tokens", 16)]
        headers = {"x-request-id": f"req-{sum(app.state.calls.values())}"}
        if model != BASE:
            headers["x-loraplex-adapter"] = f"{model}@v1"
        usage = {
            "prompt_tokens": 3,
            "completion_tokens": len(words),
            "total_tokens": 3 + len(words),
        }
        if not body.get("stream"):
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": "".join(words)}}
                if chat
                else {"index": 0, "text": "".join(words)}
            )
            choice["finish_reason"] = "length"
            return JSONResponse({"choices": [choice], "usage": usage}, headers=headers)

        async def events() -> Iterator[str]:
            for i, word in enumerate(words):
                await asyncio.sleep(0.005)
                finish = "length" if i == len(words) - 1 else None
                piece = {"delta": {"content": word}} if chat else {"text": word}
                chunk = {"choices": [{"index": 0, **piece, "finish_reason": finish}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await complete(request, chat=True)

    return app


@dataclass(frozen=True)
class StubServer:
    """A running stub: its base URL, its app (``app.state`` records calls), the base name."""

    url: str
    app: FastAPI
    base: str = BASE


@contextmanager
def stub_server() -> Iterator[StubServer]:
    """Run the stub on a free local port until the block ends."""
    app = make_app()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("stub server did not start")
        time.sleep(0.02)
    try:
        yield StubServer(f"http://127.0.0.1:{port}", app)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
