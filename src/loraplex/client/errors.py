"""Typed client exceptions that mirror the server's HTTP errors.

Each class subclasses the matching server-side class of ``loraplex.errors`` (so
``except loraplex.errors.NotFound`` catches a 404 the client received) and ``APIError``
(so ``except APIError`` catches every error response). Names follow the ``openai`` SDK.
This module only maps responses to exceptions; it does not retry or fall back.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from loraplex import errors


class APIError(errors.LoraplexError):
    """The server answered with an error status (or an error event inside a stream)."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        code: str | None = None,
        error_type: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.status_code = status_code
        if code is not None:
            self.code = code
        if error_type is not None:
            self.error_type = error_type
        self.request_id = request_id
        self.body = body
        self.attempts = 1

    def __str__(self) -> str:
        return f"{self.status_code} {self.code}: {self.message}"


class BadRequestError(APIError, errors.InvalidRequest):
    """400: the request is malformed."""


class InvalidAdapterError(BadRequestError, errors.InvalidAdapter):
    """400 ``invalid_adapter``: the adapter failed validation."""


class AuthenticationError(APIError, errors.Unauthorized):
    """401: no key or an unknown key."""


class PermissionDeniedError(APIError, errors.Forbidden):
    """403: the adapter belongs to another tenant."""


class NotFoundError(APIError, errors.NotFound):
    """404: unknown adapter, version or alias."""


class ConflictError(APIError, errors.Conflict):
    """409: the state forbids the operation."""


class IncompatibleAdapterError(ConflictError, errors.IncompatibleAdapter):
    """409 ``adapter_incompatible``: the adapter does not fit the base model."""


class PayloadTooLargeError(APIError, errors.TooLarge):
    """413: request or adapter too large."""


class RateLimitError(APIError, errors.RateLimited):
    """429: over the tenant's limit; ``retry_after`` is the server's hint in seconds."""


class UnavailableError(APIError, errors.Unavailable):
    """503: not ready, draining, or the adapter cannot be loaded now."""


class InternalServerError(APIError):
    """Any other 5xx."""


class APIConnectionError(errors.Unavailable):
    """No response came back: connection refused, reset, or timed out."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.attempts = 1


class APITimeoutError(APIConnectionError):
    """The request timed out before a response (or the next stream event) arrived."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    429: RateLimitError,
    503: UnavailableError,
}
_BY_CODE: dict[str, type[APIError]] = {
    "invalid_adapter": InvalidAdapterError,
    "adapter_incompatible": IncompatibleAdapterError,
}


def status_for_code(code: object) -> int:
    """The HTTP status a loraplex error ``code`` maps to (500 when unknown).

    Used for error events inside a stream, which carry a code but no status.
    """
    if isinstance(code, int):
        return code
    for cls in (*_BY_CODE.values(), *_BY_STATUS.values()):
        if getattr(cls, "code", None) == code:
            return int(cls.status_code)
    return 500


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date); None if unusable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        from datetime import UTC, datetime
        from email.utils import parsedate_to_datetime

        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds)


def error_from_body(
    status_code: int,
    body: Any,
    *,
    request_id: str | None = None,
    retry_after: float | None = None,
) -> APIError:
    """Build the exception for an error body (OpenAI style ``{"error": {...}}`` or anything)."""
    detail = body.get("error") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        message = str(detail.get("message") or "")
        code = detail.get("code")
        code = str(code) if code is not None else None
        error_type = detail.get("type")
    else:
        message = detail if isinstance(detail, str) else ""
        code, error_type = None, None
        if not message and isinstance(body, dict) and isinstance(body.get("detail"), str):
            message = body["detail"]
    if not message:
        message = (str(body)[:500] if body else "") or f"HTTP {status_code} with an empty body."
    cls = _BY_CODE.get(code or "") or _BY_STATUS.get(status_code)
    if cls is None:
        cls = InternalServerError if status_code >= 500 else APIError
    return cls(
        message,
        status_code=status_code,
        code=code,
        error_type=error_type,
        request_id=request_id,
        retry_after=retry_after,
        body=body,
    )


def error_from_response(response: httpx.Response) -> APIError:
    """Build the exception for an error response whose body has been read."""
    try:
        body: Any = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = response.text
    return error_from_body(
        response.status_code,
        body,
        request_id=response.headers.get("x-request-id"),
        retry_after=parse_retry_after(response.headers.get("retry-after")),
    )


def error_from_transport(exc: httpx.TransportError) -> APIConnectionError:
    """The exception for a request that got no response (refused, reset, timed out)."""
    cls = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
    return cls(f"{type(exc).__name__}: {exc or 'no response from the server'}")


def allows_fallback(exc: BaseException) -> bool:
    """True when the error says the adapter cannot serve now, so the base model may answer.

    That is 503, other 5xx, and 409 ``adapter_incompatible``. Never 400/401/403/404/413/429:
    those are the caller's mistake or limit, and the base model must not hide them.
    """
    if isinstance(exc, IncompatibleAdapterError):
        return True
    return isinstance(exc, APIError) and exc.status_code >= 500
