"""Adapter versions that failed to load, remembered for a while so that they cost nothing.

A version's files never change, so a load that failed for the adapter's own reasons (bad
shapes, a rank over the limit, weights the engine refuses) fails again; asking the engine
for it on every request would let one broken adapter tax everyone. Each entry keeps the
error to raise again and how many times the engine was asked. Transient failures (engine
down, cache full) are not remembered: the caller decides what to record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from loraplex.errors import LoraplexError


@dataclass
class Failure:
    """Why ``version`` failed, until when it is refused, and how often the engine was asked."""

    error: type[LoraplexError]
    message: str
    until: float
    attempts: int


class FailedLoads:
    """Version -> its last load failure, forgotten ``ttl`` seconds after it happened."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._failures: dict[str, Failure] = {}

    def record(self, version: str, error: LoraplexError) -> None:
        previous = self._failures.get(version)
        attempts = previous.attempts + 1 if previous else 1
        until = self._clock() + self.ttl
        self._failures[version] = Failure(type(error), error.message, until, attempts)

    def check(self, version: str) -> None:
        """Raise the remembered error of ``version`` if it failed less than ``ttl`` ago."""
        failure = self._failures.get(version)
        if failure is None:
            return
        if self._clock() >= failure.until:
            return  # expired: the next load asks the engine again (and counts the attempt)
        raise failure.error(failure.message)

    def forget(self, version: str) -> None:
        self._failures.pop(version, None)

    def report(self) -> list[dict[str, object]]:
        """The remembered failures, for the admin listing."""
        now = self._clock()
        return [
            {
                "version": version,
                "error": f.message,
                "engine_attempts": f.attempts,
                "retry_in_seconds": round(max(0.0, f.until - now), 1),
            }
            for version, f in self._failures.items()
        ]
