"""The request body size limit: 413 before the app sees a body larger than allowed.

A declared ``content-length`` over the limit is refused before anything is read; otherwise
the body is counted as it arrives, so a chunked upload without ``content-length`` is stopped
as soon as it passes the limit. A body within the limit is handed to the app whole. This is
plain ASGI middleware (FastAPI would turn an error raised while it reads a body into a 400).
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplex.errors import TooLarge
from loraplex.server.errors import error_response


class BodyLimit:
    """Answer 413 to HTTP requests whose body is over ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(declared, scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(f"more than {self.max_bytes}", scope, receive, send)
                return
            more = message.get("more_body", False)
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, size: str, scope: Scope, receive: Receive, send: Send) -> None:
        exc = TooLarge(f"Request body is {size} bytes; the limit is {self.max_bytes}.")
        await error_response(exc.status_code, exc.message, exc.error_type, exc.code)(
            scope, receive, send
        )
