"""Recent request outcomes per adapter, for the web console's live charts.

Keeps, per adapter label (capped like the metrics' labels), the end time and duration of the
requests of the last ``horizon`` seconds; ``snapshot`` gives each adapter's request rate and
p50/p99 end-to-end latency over a window. In memory only; Prometheus keeps the history.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any


def quantile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of non-empty ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class LiveStats:
    """Per-adapter request times of the last ``horizon`` seconds."""

    def __init__(self, horizon: float = 300, clock: Callable[[], float] = time.monotonic) -> None:
        self.horizon = horizon
        self.clock = clock
        self._done: defaultdict[str, deque[tuple[float, float, bool]]] = defaultdict(deque)
        self._lock = threading.Lock()

    def record(self, adapter: str, seconds: float, ok: bool) -> None:
        with self._lock:
            events = self._done[adapter]
            events.append((self.clock(), seconds, ok))
            self._prune(events)

    def snapshot(self, window: float = 30) -> dict[str, dict[str, Any]]:
        """Adapter -> requests/s, errors/s, p50 and p99 seconds over the last ``window`` s."""
        since = self.clock() - window
        out = {}
        with self._lock:
            for adapter, events in self._done.items():
                self._prune(events)
                recent = [(s, ok) for t, s, ok in events if t >= since]
                times = [s for s, _ in recent]
                out[adapter] = {
                    "rate": len(recent) / window,
                    "error_rate": sum(not ok for _, ok in recent) / window,
                    "p50": quantile(times, 0.5) if times else None,
                    "p99": quantile(times, 0.99) if times else None,
                }
        return out

    def _prune(self, events: deque[tuple[float, float, bool]]) -> None:
        horizon = self.clock() - self.horizon
        while events and events[0][0] < horizon:
            events.popleft()
