"""The one exception hierarchy of loraplex.

Errors are raised deep in the code with a message that says what went wrong and what to do;
the server maps them to HTTP once (see ``loraplex.server.errors``), the CLI prints them.
Each class carries the HTTP status and the OpenAI error ``type``/``code`` it maps to.
"""

from __future__ import annotations


class LoraplexError(Exception):
    """Base class: anything loraplex raises on purpose."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str = "internal_error"

    def __init__(
        self, message: str, *, retry_after: float | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.param = param  # the request field at fault (OpenAI's ``error.param``)


class InvalidRequest(LoraplexError):
    """The request or input is malformed (400)."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(LoraplexError):
    """No key, or a key that is not known (401)."""

    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(LoraplexError):
    """The key is valid but the adapter belongs to another tenant (403)."""

    status_code = 403
    error_type = "permission_error"
    code = "forbidden"


class NotFound(LoraplexError):
    """Unknown adapter, version or alias (404)."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class Conflict(LoraplexError):
    """The state forbids the operation, e.g. deleting a version an alias points at (409)."""

    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"


class IncompatibleAdapter(Conflict):
    """The adapter does not fit the base model: fingerprint, modules, shapes, rank (409)."""

    code = "adapter_incompatible"


class TooLarge(LoraplexError):
    """The request or the adapter is larger than allowed (413)."""

    status_code = 413
    error_type = "invalid_request_error"
    code = "too_large"


class RateLimited(LoraplexError):
    """The tenant is over its limit; ``retry_after`` seconds says when to retry (429)."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limited"


class Unavailable(LoraplexError):
    """The server is not ready, draining, or the adapter cannot be loaded now (503)."""

    status_code = 503
    error_type = "server_error"
    code = "unavailable"


class InvalidAdapter(InvalidRequest):
    """An adapter folder or file fails validation (400 on upload, refused before storage)."""

    code = "invalid_adapter"


class DeadlineExceeded(LoraplexError):
    """The request ran past its deadline and was stopped (504)."""

    status_code = 504
    error_type = "server_error"
    code = "deadline_exceeded"
