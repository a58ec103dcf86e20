"""Liveness: is the engine making progress, and is it alive at all.

``ProgressTracker`` (pure) counts generations in progress and remembers when the engine last
produced a token: the engine is stalled when requests wait and none came for ``stall_seconds``
(a stopped or wedged engine process; a slow one still produces tokens). ``watch_engine`` polls
the engine's health and calls ``on_death`` once when it dies, so that the process can exit
non-zero and its supervisor restart it. Neither decides what HTTP says; ``health`` does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from loraplex.engine.types import Engine
from loraplex.errors import LoraplexError

log = logging.getLogger("loraplex.server")


class ProgressTracker:
    """Generations in progress and the time of the engine's last sign of progress."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.waiting = 0
        self.last_progress = clock()

    def started(self) -> None:
        """A generation was handed to the engine; an idle engine starts its clock now."""
        if self.waiting == 0:
            self.last_progress = self.clock()
        self.waiting += 1

    def progressed(self) -> None:
        """The engine produced output."""
        self.last_progress = self.clock()

    def finished(self) -> None:
        """A generation ended (done, failed or cancelled)."""
        self.waiting = max(0, self.waiting - 1)
        self.last_progress = self.clock()

    def stalled_for(self) -> float:
        """Seconds without progress while requests wait (0 when nothing waits)."""
        return self.clock() - self.last_progress if self.waiting else 0.0


async def watch_engine(
    engine: Engine, on_death: Callable[[str], None], interval: float = 0.5
) -> None:
    """Poll ``engine.check_health`` every ``interval`` s; call ``on_death(reason)`` once."""
    while True:
        try:
            await engine.check_health()
        except LoraplexError as exc:
            log.error("the inference engine died: %s", exc.message)
            on_death(exc.message)
            return
        await asyncio.sleep(interval)
