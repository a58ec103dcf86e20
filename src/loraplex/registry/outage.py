"""Riding out a registry outage: bounded calls that remember an outage, and last-known-good
values whose staleness is bounded.

``BoundedCaller`` runs each blocking call (a catalog query, a store check) on its own daemon
thread and waits at most ``timeout`` seconds, so a hung database (a stopped server answers
nothing, and no client timeout fires on a query already sent) costs a request a bounded wait,
not a worker thread forever. A call that times out or raises ``Unavailable`` marks the
dependency down: for ``retry_seconds`` further calls fail at once, then one call probes it
again. Any answer, ``NotFound`` included, marks it up. ``LastKnownGood`` keeps the last
successful answer per key for ``max_age`` seconds. Neither knows what a registry holds.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from loraplex.errors import Unavailable

T = TypeVar("T")


class BoundedCaller:
    """Calls to one dependency (``what``), each bounded in time, with outage memory."""

    def __init__(
        self,
        what: str,
        timeout: float,
        retry_seconds: float,
        max_running: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self.max_running = max_running
        self.clock = clock
        self._lock = threading.Lock()
        self._running = 0
        self._error: str | None = None
        self._down_since = 0.0
        self._retry_at = 0.0

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` within ``timeout`` seconds, else ``Unavailable``; at once while down."""
        with self._lock:
            now = self.clock()
            if self._error is not None:
                if now < self._retry_at:
                    raise self._unavailable(now)
                self._retry_at = now + self.retry_seconds  # this call probes; others wait
            if self._running >= self.max_running:
                raise Unavailable(
                    f"{self.max_running} calls to {self.what} are still waiting for an answer; "
                    "retry later.",
                    retry_after=self.retry_seconds,
                )
            self._running += 1
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                outcome["result"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                outcome["error"] = exc
            finally:
                with self._lock:
                    self._running -= 1
                done.set()

        threading.Thread(target=run, name=f"bounded {self.what}", daemon=True).start()
        if not done.wait(self.timeout):
            raise self._failed(f"no answer within {self.timeout:g} s")
        error = outcome.get("error")
        if isinstance(error, Unavailable):
            raise self._failed(error.message) from error
        self._up()
        if error is not None:
            raise error
        return outcome["result"]

    def state(self) -> dict[str, Any]:
        """``{"ok": True}`` or ``{"ok": False, "error": ..., "down_seconds": ...}``."""
        with self._lock:
            if self._error is None:
                return {"ok": True}
            down = round(self.clock() - self._down_since, 1)
            return {"ok": False, "error": self._error, "down_seconds": down}

    def _failed(self, reason: str) -> Unavailable:
        with self._lock:
            now = self.clock()
            if self._error is None:
                self._down_since = now
            self._error = reason
            self._retry_at = now + self.retry_seconds
            return self._unavailable(now)

    def _up(self) -> None:
        with self._lock:
            self._error = None

    def _unavailable(self, now: float) -> Unavailable:
        return Unavailable(
            f"{self.what} is unreachable ({self._error}; down for {now - self._down_since:.0f} s).",
            retry_after=self.retry_seconds,
        )


class LastKnownGood(Generic[T]):
    """The last good value per key, served for at most ``max_age`` seconds (LRU-bounded)."""

    def __init__(
        self,
        max_age: float,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_age = max_age
        self.max_entries = max_entries
        self.clock = clock
        self._lock = threading.Lock()
        self._values: OrderedDict[Hashable, tuple[float, T]] = OrderedDict()

    def put(self, key: Hashable, value: T) -> None:
        with self._lock:
            self._values[key] = (self.clock(), value)
            self._values.move_to_end(key)
            while len(self._values) > self.max_entries:
                self._values.popitem(last=False)

    def get(self, key: Hashable) -> T | None:
        """The value stored for ``key`` at most ``max_age`` seconds ago, else None."""
        with self._lock:
            found = self._values.get(key)
        if found is None or self.clock() - found[0] > self.max_age:
            return None
        return found[1]

    def drop(self, key: Hashable) -> None:
        with self._lock:
            self._values.pop(key, None)
