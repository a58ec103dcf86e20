"""The request head size limit: 413 before the app sees headers larger than allowed.

Two layers keep a huge head from costing memory or reaching a route. The HTTP parser
(uvicorn's h11, see ``serve_cli``) stops buffering a head past ``max_header_bytes`` and
answers 400 with the connection closed; this ASGI middleware refuses, with an OpenAI error
body, any head the parser let through that is still over the limit (the parser checks only
between reads, so a head can pass it by up to one read). The count is the request target
plus each header's name and value; this module does nothing else.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from loraplex.errors import TooLarge
from loraplex.server.errors import error_response


class HeaderLimit:
    """Answer 413 to HTTP requests whose target and headers are over ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            size = target + sum(len(name) + len(value) for name, value in scope["headers"])
            if size > self.max_bytes:
                exc = TooLarge(
                    f"Request headers are {size} bytes; the limit is {self.max_bytes} "
                    "(LORAPLEX_MAX_HEADER_BYTES)."
                )
                response = error_response(exc.status_code, exc.message, exc.error_type, exc.code)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
