"""Weighted fair admission to the engine.

The engine gets at most ``capacity`` sequences at once. When it is full, requests wait in
per-tenant queues and are let in by start-time fair queueing over tokens: a request's start
tag is ``max(virtual time, where its tenant's previous request ended)``, it ends
``tokens / weight`` later, the smallest start tag goes first, and the virtual time is the start
tag of the last request let in. A tenant that floods only pushes its own tags further out; two
busy tenants with weights 2:1 get tokens in that ratio; using an idle engine costs nothing
later; a request that never got in is not charged.

vLLM never pre-empts a running sequence for a new one, so once a flood holds every seat a
light tenant would wait for a whole flood request to finish. The last ``reserve`` seats are
therefore kept for tenants that hold no seat: a tenant alone can use ``capacity - reserve``,
and a light tenant's request starts at once. A tenant's queue is bounded (429 when full) and
so is the wait (429 with ``Retry-After`` after ``timeout`` seconds). Single event loop, no
locks.
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

    def __init__(self, capacity: int, queue_size: int, timeout: float, reserve: int = 0) -> None:
        self.capacity = capacity
        self.reserve = min(reserve, capacity - 1)
        self.queue_size = queue_size
        self.timeout = timeout
        self.in_use = 0
        self._held: dict[str, int] = defaultdict(int)
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
        seats = min(seats, self.capacity - self.reserve)
        start = max(self._virtual_time, self._end_tag[tenant])
        cost = max(tokens, 1) / weight
        if not self._heap and self._fits(tenant, seats):
            self._end_tag[tenant] = start + cost
            self._take(tenant, seats, start)
            return seats
        if self._waiting[tenant] >= self.queue_size:
            raise RateLimited(
                f"Tenant '{tenant}' already has {self._waiting[tenant]} requests waiting, its "
                "queue's limit; retry later.",
                retry_after=1,
            )
        self._end_tag[tenant] = start + cost
        granted = asyncio.get_running_loop().create_future()
        waiter = _Waiter(start, next(self._order), tenant, seats, granted)
        heapq.heappush(self._heap, waiter)
        self._waiting[tenant] += 1
        self._dispatch()  # it may fit now although others wait (see _dispatch)
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
                self.release(tenant, seats)  # granted as the caller went away
            else:
                waiter.granted.cancel()
                self._refund(tenant, cost)
            raise
        finally:
            self._waiting[tenant] -= 1
            self._dispatch()
        return seats

    def release(self, tenant: str, seats: int) -> None:
        """Give back seats taken by ``acquire`` and let waiting requests in."""
        self.in_use -= seats
        self._held[tenant] -= seats
        if not self._held[tenant]:
            del self._held[tenant]
        self._dispatch()

    def _fits(self, tenant: str, seats: int) -> bool:
        """Room for ``seats`` more; the reserved seats only for a tenant that holds none."""
        limit = self.capacity if not self._held.get(tenant) else self.capacity - self.reserve
        return self.in_use + seats <= limit

    def _take(self, tenant: str, seats: int, start: float) -> None:
        self.in_use += seats
        self._held[tenant] += seats
        self._virtual_time = max(self._virtual_time, start)

    def _refund(self, tenant: str, cost: float) -> None:
        """A request that never got in is not charged to its tenant's share."""
        self._end_tag[tenant] = max(self._virtual_time, self._end_tag[tenant] - cost)

    def _dispatch(self) -> None:
        """Let waiters in by start tag. One held back only by the reserve does not block
        the waiters behind it (they may be light tenants the reserve is for); one waiting
        for room does, so that a request of several sequences is not starved."""
        granted = False
        for waiter in sorted(self._heap):
            if waiter.granted.done():
                continue
            if self.in_use + waiter.seats > self.capacity:
                break
            if self._fits(waiter.tenant, waiter.seats):
                self._take(waiter.tenant, waiter.seats, waiter.start)
                waiter.granted.set_result(None)
                granted = True
        if granted or any(w.granted.done() for w in self._heap):
            self._heap = [w for w in self._heap if not w.granted.done()]
            heapq.heapify(self._heap)
