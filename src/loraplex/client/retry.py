"""When and how long the client waits before retrying a request.

Retries happen on 429 and 503 (and on connection failures where no request reached the
server), with exponential backoff and full jitter, never sooner than the server's
``Retry-After``. ``RetryPolicy`` holds the settings; ``RetrySchedule`` applies them to the
attempts of one request. This module only computes decisions and delays; it performs no I/O.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import httpx

from loraplex.client.errors import (
    APIConnectionError,
    APIError,
    error_from_response,
    error_from_transport,
)

RETRY_STATUSES = frozenset({429, 503})


@dataclass
class RetryPolicy:
    """Retry settings. ``max_retries=0`` disables retries."""

    max_retries: int = 3
    """Retries after the first attempt (so at most ``max_retries + 1`` attempts)."""
    backoff_base: float = 0.5
    """Seconds; the n-th retry waits up to ``backoff_base * 2**(n-1)`` (full jitter)."""
    backoff_max: float = 8.0
    """Upper bound of the computed backoff, in seconds."""
    max_retry_after: float = 60.0
    """A ``Retry-After`` longer than this is not waited for: the error is raised instead."""
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.backoff_base < 0 or self.backoff_max < 0 or self.max_retry_after < 0:
            raise ValueError("backoff_base, backoff_max and max_retry_after must be >= 0")

    def retryable(self, status_code: int) -> bool:
        """Whether a response with this status may be retried."""
        return status_code in RETRY_STATUSES

    def delay(self, retry: int, retry_after: float | None = None) -> float | None:
        """Seconds to wait before retry number ``retry`` (1-based); None means do not retry.

        With a ``Retry-After`` the wait is that value plus up to 10% jitter (so that many
        clients told the same time do not return together); without, full jitter backoff.
        """
        if retry < 1 or retry > self.max_retries:
            return None
        if retry_after is not None:
            if retry_after > self.max_retry_after:
                return None
            return retry_after + self.rng.uniform(0.0, 0.1 * retry_after)
        cap = min(self.backoff_max, self.backoff_base * 2 ** (retry - 1))
        return self.rng.uniform(0.0, cap)


class RetrySchedule:
    """The attempts of one request: after each failure, the seconds to wait or the error.

    ``attempt`` is the number of the attempt in flight (1 for the first). Each ``after_*``
    method either returns the delay before the next attempt (and counts it) or raises the
    error, with ``attempts`` set, when no retry is due.
    """

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.attempt = 1

    def after_transport_error(self, exc: httpx.TransportError) -> float:
        """No response: retried only if the connection failed, so nothing reached the server."""
        error = error_from_transport(exc)
        connect_failed = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
        delay = self.policy.delay(self.attempt) if connect_failed else None
        return self._next(error, delay, exc)

    def after_error_response(self, response: httpx.Response) -> float:
        """An error status whose body has been read: retried on 429/503 only."""
        error = error_from_response(response)
        delay = None
        if self.policy.retryable(response.status_code):
            delay = self.policy.delay(self.attempt, error.retry_after)
        return self._next(error, delay, None)

    def _next(
        self, error: APIError | APIConnectionError, delay: float | None, cause: Exception | None
    ) -> float:
        if delay is None:
            error.attempts = self.attempt
            if cause is not None:
                raise error from cause
            raise error
        self.attempt += 1
        return delay
