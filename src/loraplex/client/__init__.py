"""Client for loraplex (and any OpenAI-compatible server) with retries and labelled fallback.

``Client`` (blocking) and ``AsyncClient`` send completions and chat requests, stream them,
retry 429/503 with backoff honouring ``Retry-After``, raise typed errors that mirror the
server's codes, and can fall back to the base model when an adapter cannot serve now.
The load generator is ``loraplex.client.bench`` (imported separately: it needs numpy).
"""

from loraplex.client.async_client import AsyncClient, AsyncStream
from loraplex.client.client import Client, Stream
from loraplex.client.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    IncompatibleAdapterError,
    InternalServerError,
    InvalidAdapterError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    UnavailableError,
)
from loraplex.client.retry import RetryPolicy
from loraplex.client.types import Chunk, Completion

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "Chunk",
    "Client",
    "Completion",
    "ConflictError",
    "IncompatibleAdapterError",
    "InternalServerError",
    "InvalidAdapterError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "RetryPolicy",
    "Stream",
    "UnavailableError",
]
