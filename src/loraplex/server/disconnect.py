"""Stop work whose client has gone: a non-streaming request cancelled on ``http.disconnect``.

Cancelling a generation aborts its engine request (vLLM aborts on cancellation), so nothing is
generated for nobody. Streaming responses need no help: Starlette cancels the stream when the
client disconnects.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from loraplex.errors import LoraplexError

T = TypeVar("T")


class ClientGone(LoraplexError):
    """The client closed the connection before its answer was ready (499, never sent)."""

    status_code = 499
    error_type = "invalid_request_error"
    code = "client_closed_request"


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``await work``, cancelled (``ClientGone``) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watch):
            pending.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        raise ClientGone("The client disconnected; its request was stopped.")
    return task.result()
