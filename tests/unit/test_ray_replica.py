"""``ray_replica.run_asgi``: a request dict runs through a FastAPI app in process; its ASGI
messages come back in order (streaming included), and a consumer that stops early tells the
app the client disconnected (it stops generating)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from loraplex.server.ray_replica import run_asgi


def request(path: str, body: bytes = b"") -> dict[str, object]:
    return {
        "method": "POST",
        "path": path,
        "query_string": b"x=1",
        "headers": [(b"content-type", b"application/json")],
        "body": body,
        "client": ["127.0.0.1", 5000],
    }


def make_app(disconnected: asyncio.Event) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(req: Request) -> dict[str, object]:
        return {"body": (await req.body()).decode(), "x": req.query_params["x"]}

    @app.post("/stream")
    async def stream(req: Request) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            try:
                for i in range(1000):
                    yield f"chunk{i};".encode()
                    await asyncio.sleep(0.01)
            finally:  # Starlette cancels the stream when receive() says the client left
                disconnected.set()

        return StreamingResponse(chunks(), media_type="text/plain")

    return app


def test_messages_come_back_in_order() -> None:
    async def main() -> list[dict[str, object]]:
        app = make_app(asyncio.Event())
        return [m async for m in run_asgi(app, request("/echo", b'{"a": 1}'))]

    messages = asyncio.run(main())
    assert messages[0]["type"] == "http.response.start" and messages[0]["status"] == 200
    body = b"".join(m.get("body", b"") for m in messages[1:])
    assert body == b'{"body":"{\\"a\\": 1}","x":"1"}'


def test_stopping_early_is_a_disconnect() -> None:
    async def main() -> bool:
        disconnected = asyncio.Event()
        app = make_app(disconnected)
        stream = run_asgi(app, request("/stream"))
        seen = [await anext(stream) for _ in range(3)]  # start + two chunks
        assert seen[1]["body"] == b"chunk0;"
        await stream.aclose()
        return disconnected.is_set()

    assert asyncio.run(main())
