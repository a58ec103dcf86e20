"""The one place where errors become HTTP responses with an OpenAI error body.

``{"error": {"message", "type", "param", "code"}}`` (``param``: the request field at fault,
or null); 429/503 carry ``Retry-After``. Request body validation errors are 400 (not
FastAPI's 422) because OpenAI clients expect 400; an unknown field is one of them. An adapter
that "did not load" because the engine is dead is the engine's 503, never a 409.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.errors import IncompatibleAdapter, LoraplexError
from loraplex.server.request_context import current

log = logging.getLogger(__name__)


def error_response(
    status: int,
    message: str,
    error_type: str,
    code: str,
    retry_after: float | None = None,
    param: str | None = None,
) -> JSONResponse:
    """An OpenAI-style error response."""
    headers = {"retry-after": str(max(1, round(retry_after)))} if retry_after else None
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def error_event(exc: LoraplexError) -> str:
    """The SSE event that ends a stream failing after it started (then ``[DONE]``)."""
    error = {"message": exc.message, "type": exc.error_type, "code": exc.code}
    return f"data: {json.dumps({'error': error})}\n\n"


def _where(err: dict) -> str:
    return ".".join(str(p) for p in err.get("loc", ()) if p != "body")


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        if err.get("type") == "extra_forbidden":
            parts.append(f"{_where(err)}: not a supported parameter")
        else:
            parts.append(f"{_where(err) or 'body'}: {err.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(parts)


def _validation_param(exc: RequestValidationError) -> str | None:
    """The first field at fault (top-level name first, as OpenAI names it), if any."""
    for err in exc.errors():
        if where := _where(err):
            return where
    return None


def install_error_handlers(app: FastAPI) -> None:
    """Map loraplex errors, validation errors and stray exceptions to OpenAI bodies."""

    @app.exception_handler(LoraplexError)
    async def _loraplex(request: Request, exc: LoraplexError) -> JSONResponse:
        service = getattr(request.app.state, "service", None)
        if isinstance(exc, IncompatibleAdapter) and service is not None:
            try:
                await service.engine.check_health()
            except LoraplexError as dead:
                exc = dead
        record = current()
        if record is not None:
            record.error = f"{exc.code}: {exc.message}"
        return error_response(
            exc.status_code, exc.message, exc.error_type, exc.code, exc.retry_after, exc.param
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message = _validation_message(exc)
        record = current()
        if record is not None:
            record.error = f"invalid_request: {message}"
        return error_response(
            400,
            message,
            "invalid_request_error",
            "invalid_request",
            param=_validation_param(exc),
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "http_error"
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error", code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(
            500, f"Internal error: {type(exc).__name__}", "server_error", "internal_error"
        )
