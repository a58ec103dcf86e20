"""Weighted fair admission to the engine.

The engine gets at most ``capacity`` sequences at once. When it is full, requests wait in
per-tenant queues and are let in by start-time fair queueing over tokens: a request's start
tag is ``max(virtual time, where its tenant's previous request ended)``, it ends
``tokens / weight`` later, the smallest start tag goes first, and the virtual time is the start
tag of the last request let in. A tenant that floods only pushes its own tags further out, so a
quiet tenant's request is next in line as soon as a slot frees; two busy tenants with weights
2:1 get tokens in that ratio; using an idle engine costs nothing later. A tenant's queue is
bounded (429 when full) and so is the wait (429 with ``Retry-After`` after ``timeout``
seconds). Single event loop, no locks.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import defaultdict
from dataclasses import dataclass, field

from loraplex.errors import RateLimited


@dataclass(order=True)
class _Waiter:
    start: float
    order: int
    tenant: str = field(compare=False)
    seats: int = field(compare=False)
    granted: asyncio.Future[None] = field(compare=False)


class FairAdmission:
    """At most ``capacity`` sequences in the engine; the rest queue fairly by tenant weight."""

    def __init__(self, capacity: int, queue_size: int, timeout: float) -> None:
        self.capacity = capacity
        self.queue_size = queue_size
        self.timeout = timeout
        self.in_use = 0
        self._virtual_time = 0.0
        self._end_tag: dict[str, float] = defaultdict(float)
        self._waiting: dict[str, int] = defaultdict(int)
        self._heap: list[_Waiter] = []
        self._order = itertools.count()

    def waiting(self, tenant: str | None = None) -> int:
        """Requests waiting (of one tenant, or all)."""
        return self._waiting[tenant] if tenant is not None else sum(self._waiting.values())

    async def acquire(self, tenant: str, weight: float, seats: int, tokens: int) -> int:
        """Wait for ``seats`` sequences of room; returns the seats to ``release`` later."""
        seats = min(seats, self.capacity)
        start = max(self._virtual_time, self._end_tag[tenant])
        if not self._heap and self.in_use + seats <= self.capacity:
            self._end_tag[tenant] = start + max(tokens, 1) / weight
            self._virtual_time = start
            self.in_use += seats
            return seats
        if self._waiting[tenant] >= self.queue_size:
            raise RateLimited(
                f"Tenant '{tenant}' already has {self._waiting[tenant]} requests waiting, its "
                "queue's limit; retry later.",
                retry_after=1,
            )
        cost = max(tokens, 1) / weight
        self._end_tag[tenant] = start + cost
        granted = asyncio.get_running_loop().create_future()
        waiter = _Waiter(start, next(self._order), tenant, seats, granted)
        heapq.heappush(self._heap, waiter)
        self._waiting[tenant] += 1
        self._dispatch()  # it may be first in line with room free (the head needs more)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.granted), self.timeout)
        except TimeoutError:
            if not waiter.granted.done():
                waiter.granted.cancel()
                self._refund(tenant, cost)
                raise RateLimited(
                    f"The server is busy: waited {self.timeout:.0f}s for a turn; retry later.",
                    retry_after=max(1, round(self.timeout / 4)),
                ) from None
        except asyncio.CancelledError:
            if waiter.granted.done() and not waiter.granted.cancelled():
                self.release(seats)  # granted as the caller went away
            else:
                waiter.granted.cancel()
                self._refund(tenant, cost)
            raise
        finally:
            self._waiting[tenant] -= 1
            self._dispatch()
        return seats

    def release(self, seats: int) -> None:
        """Give back seats taken by ``acquire`` and let waiting requests in."""
        self.in_use -= seats
        self._dispatch()

    def _refund(self, tenant: str, cost: float) -> None:
        """A request that never got in is not charged to its tenant's share."""
        self._end_tag[tenant] = max(self._virtual_time, self._end_tag[tenant] - cost)

    def _dispatch(self) -> None:
        while self._heap:
            head = self._heap[0]
            if head.granted.done():  # timed out or cancelled
                heapq.heappop(self._heap)
                continue
            if self.in_use + head.seats > self.capacity:
                return
            heapq.heappop(self._heap)
            self.in_use += head.seats
            self._virtual_time = max(self._virtual_time, head.start)
            head.granted.set_result(None)
