"""When and how long the client waits before retrying a request.

Retries happen on 429 and 503 (and on connection failures where no request reached the
server), with exponential backoff and full jitter, never sooner than the server's
``Retry-After``. This module only computes decisions and delays; it performs no I/O.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

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
