"""Weighted fair admission to the engine.

The engine gets at most ``capacity`` sequences at once. When it is full, requests wait in
per-tenant queues and are let in by start-time fair queueing over tokens: a request's start
tag is ``max(virtual time, where its tenant's previous request ended)``, it ends
``tokens / weight`` later, the smallest start tag goes first, and the virtual time is the start
tag of the last request let in. A tenant that floods only pushes its own tags further out; two
busy tenants with weights 2:1 get tokens in that ratio; using an idle engine costs nothing
later; a request that never got in is not charged.

Two rules keep a light tenant's latency close to what it sees alone, since vLLM never
pre-empts a running sequence for a new one and, on CPU, every sequence in the batch makes
each step slower:

- Reserve: the last ``reserve`` seats are kept for tenants that hold no seat, so a light
  tenant's request starts at once beside a flood; a tenant alone can use
  ``capacity - reserve``.
- Shares: ``shared`` seats (default ``capacity - reserve``) are divided by weight among the
  active tenants (holding a seat, waiting, or done less than ``idle`` seconds ago). The
  tenants that want more (waiting, or asking now) may hold together at most their shares'
  sum; the part of the other tenants' shares that they do not use stays free, it is not
  lent. So while a quiet tenant is active, a flooding tenant of the same weight holds at
  most half the seats and the quiet tenant's requests run in a batch about half as large;
  busy tenants among themselves are split by the fair queue; a tenant alone (or whose
  neighbours are all busy) can still fill the engine. A tenant holding no seat may always
  start a request when there is room, so a share never starves anyone. ``shared=0`` turns
  shares off (throughput over the light tenants' latency).
- Lending: with ``lend`` > 0 the tenants that want more may together borrow up to ``lend``
  seats of the other tenants' unused shares (``capacity``: all of them). A lender takes its share
  back by admission order, never by aborting a request: while a lender waits (a tenant
  holding none, or one whose request fits in its share), borrowers get no new seat and the
  lender gets the next one that frees; borrowed seats come back as the borrowers' requests
  end. A tenant waiting only for an adapter slot lends nothing back meanwhile.
- Grace: a seat that a tenant within its share gives back stays its own for ``grace``
  seconds while others wait, so a client whose next request follows the last one's end
  takes it back before a borrower does. Without it, equal-length requests that start
  together end together, the waiting borrowers take every seat freed by the wave, and the
  weights even out.

Adapters: the engine runs at most ``slots`` adapters in one batch; requests of more adapters
than that swap adapters in and out of the slots and shrink the batch. So a request whose
adapter is not among those in the engine now, when ``slots`` adapters already are, is held
back (not blocking the others) while requests of those adapters go in: requests are grouped
by adapter. After ``adapter_wait`` seconds it blocks the queue instead, so the engine drains
until a slot frees and it goes in next: no adapter starves. Requests of the base model need
no slot. ``slots=None`` turns this off; the server does so unless
``--adapter-wait-seconds`` is above 0 (the default is 0: vLLM's scheduler already keeps such a
request waiting without holding up the others, so grouping helps only when seats are short).

A tenant's queue is bounded (429 when full) and so is the wait (429 with ``Retry-After``
after ``timeout`` seconds). Single event loop, no locks.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from loraplex.errors import RateLimited


@dataclass(order=True)
class _Waiter:
    start: float
    order: int
    tenant: str = field(compare=False)
    seats: int = field(compare=False)
    granted: asyncio.Future[None] = field(compare=False)
    adapter: str | None = field(compare=False)
    since: float = field(compare=False)


class FairAdmission:
    """At most ``capacity`` sequences in the engine; the rest queue fairly by tenant weight."""

    def __init__(
        self,
        capacity: int,
        queue_size: int,
        timeout: float,
        reserve: int = 0,
        shared: int | None = None,
        idle: float = 5.0,
        lend: int = 0,
        slots: int | None = None,
        adapter_wait: float = 2.0,
        grace: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self.reserve = min(reserve, capacity - 1)
        self.shared = capacity - self.reserve if shared is None else shared
        self.idle = idle
        self.lend = lend
        self.slots = slots
        self.adapter_wait = adapter_wait
        self.grace = grace
        self._kept: dict[str, int] = defaultdict(int)  # seats in their grace, by tenant
        self._adapters: dict[str, int] = {}
        self.queue_size = queue_size
        self.timeout = timeout
        self.clock = clock
        self.in_use = 0
        self._held: dict[str, int] = defaultdict(int)
        self._weight: dict[str, float] = {}
        self._last_seen: dict[str, float] = {}
        self._virtual_time = 0.0
        self._end_tag: dict[str, float] = defaultdict(float)
        self._waiting: dict[str, int] = {}
        self._heap: list[_Waiter] = []
        self._order = itertools.count()

    def waiting(self, tenant: str | None = None) -> int:
        """Requests waiting (of one tenant, or all)."""
        return self._waiting.get(tenant, 0) if tenant is not None else sum(self._waiting.values())

    def held(self) -> dict[str, int]:
        """Engine seats each tenant holds now."""
        return dict(self._held)

    def queued(self) -> dict[str, int]:
        """Requests each tenant has waiting now."""
        return dict(self._waiting)

    def adapters(self) -> dict[str, int]:
        """Engine seats held by requests of each adapter now."""
        return dict(self._adapters)

    async def acquire(
        self, tenant: str, weight: float, seats: int, tokens: int, adapter: str | None = None
    ) -> int:
        """Wait for ``seats`` sequences of room for a request of ``adapter`` (None: the base
        model); returns the seats to ``release`` later."""
        seats = min(seats, self.capacity - self.reserve)
        self._weight[tenant] = weight
        self._last_seen[tenant] = self.clock()
        start = max(self._virtual_time, self._end_tag[tenant])
        cost = max(tokens, 1) / weight
        if not self._heap and self._fits(tenant, seats, set()) and self._has_slot(adapter):
            self._end_tag[tenant] = start + cost
            self._take(tenant, seats, start, adapter)
            return seats
        if self.waiting(tenant) >= self.queue_size:
            raise RateLimited(
                f"Tenant '{tenant}' already has {self.waiting(tenant)} requests waiting, its "
                "queue's limit; retry later.",
                retry_after=1,
            )
        self._end_tag[tenant] = start + cost
        granted = asyncio.get_running_loop().create_future()
        waiter = _Waiter(start, next(self._order), tenant, seats, granted, adapter, self.clock())
        heapq.heappush(self._heap, waiter)
        self._waiting[tenant] = self.waiting(tenant) + 1
        self._dispatch()  # it may fit now although others wait (see _dispatch)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.granted), self.timeout)
        except TimeoutError:
            if not waiter.granted.done():
                self._give_up(waiter, cost)
                raise RateLimited(
                    f"The server is busy: waited {self.timeout:.0f}s for a turn; retry later.",
                    retry_after=max(1, round(self.timeout / 4)),
                ) from None
        except asyncio.CancelledError:
            if waiter.granted.done() and not waiter.granted.cancelled():
                self.release(tenant, seats, adapter)  # granted as the caller went away
            else:
                self._give_up(waiter, cost)
            raise
        finally:
            self._last_seen[tenant] = self.clock()
            self._dispatch()
        return seats

    def release(self, tenant: str, seats: int, adapter: str | None = None) -> None:
        """Give back seats taken by ``acquire`` and let waiting requests in."""
        self.in_use -= seats
        self._held[tenant] -= seats
        if not self._held[tenant]:
            del self._held[tenant]
        if adapter is not None:
            self._adapters[adapter] -= seats
            if not self._adapters[adapter]:
                del self._adapters[adapter]
        self._last_seen[tenant] = self.clock()
        if self._keeps(tenant, seats):
            self._kept[tenant] += seats
            asyncio.get_running_loop().call_later(self.grace, self._unkeep, tenant, seats)
        self._dispatch()

    def _keeps(self, tenant: str, seats: int) -> bool:
        """Whether ``seats`` just given back by ``tenant`` stay its own for ``grace``
        seconds: lending is on, another tenant waits, and they are within its share."""
        if not (self.grace and self.lend and self.shared and tenant in self._weight):
            return False
        if not any(w.tenant != tenant for w in self._heap if not w.granted.done()):
            return False
        kept = self._kept.get(tenant, 0)
        return self._in_own_share(tenant, kept + seats, self._active_weights())

    def _unkeep(self, tenant: str, seats: int) -> None:
        """The grace of ``seats`` kept for ``tenant`` is over: others may take what is left."""
        left = self._kept.get(tenant, 0) - seats
        if left > 0:
            self._kept[tenant] = left
        else:
            self._kept.pop(tenant, None)
        self._dispatch()

    def _in_use_for(self, tenant: str) -> int:
        """Seats ``tenant`` cannot take now: those held, and those kept for other tenants."""
        return self.in_use + sum(n for t, n in self._kept.items() if t != tenant)

    def _active_weights(self) -> dict[str, float]:
        """Weights of the tenants holding a seat, waiting, or seen within ``idle`` seconds."""
        horizon = self.clock() - self.idle
        for tenant in [t for t, seen in self._last_seen.items() if seen < horizon]:
            if tenant not in self._held and tenant not in self._waiting:
                del self._last_seen[tenant]
                del self._weight[tenant]
        return dict(self._weight)

    def _fits(self, tenant: str, seats: int, lenders: set[str]) -> bool:
        """Room for ``seats`` more for ``tenant``: the reserved seats and any share only for a
        tenant that holds none; else within ``capacity - reserve`` and the shares' limit."""
        in_use = self._in_use_for(tenant)
        if not self._held.get(tenant):
            return in_use + seats <= self.capacity
        if in_use + seats > self.capacity - self.reserve:
            return False
        return self._within_shares(tenant, seats, lenders)

    def _within_shares(self, tenant: str, seats: int, lenders: set[str]) -> bool:
        """Whether ``tenant`` (holding seats) may take ``seats`` more: the tenants that hold
        seats and want more (waiting, or ``tenant`` asking now) may hold together at most the
        sum of their weighted shares of ``shared`` plus ``lend`` borrowed seats, unless every
        active tenant wants more; while another tenant in ``lenders`` waits, only within
        ``tenant``'s own share. A tenant waiting while it holds none is starting, not
        growing: it does not count."""
        if not self.shared:
            return True
        active = self._active_weights()
        total = sum(active.values())
        own = self._in_own_share(tenant, seats, active)
        if lenders - {tenant}:
            return own
        if self.lend and own:
            return True
        growing = [t for t in self._held if t in self._waiting or t == tenant]
        if len(growing) == len(active):
            return True
        limit = self.shared * sum(active[t] for t in growing) / total
        return sum(self._held[t] for t in growing) + seats <= limit + self.lend

    def _lenders(self) -> set[str]:
        """Tenants with a request waiting that takes back lent seats: one holding no seat, or
        whose request fits in its share (not one held back for an adapter slot). Empty
        unless lending is on."""
        if not (self.lend and self.shared):
            return set()
        active = self._active_weights()
        return {
            w.tenant
            for w in self._heap
            if not w.granted.done()
            and self._has_slot(w.adapter)
            and (not self._held.get(w.tenant) or self._in_own_share(w.tenant, w.seats, active))
        }

    def _in_own_share(self, tenant: str, seats: int, active: dict[str, float]) -> bool:
        """Whether ``tenant`` holding ``seats`` more stays within its weighted share."""
        share = self.shared * active[tenant] / sum(active.values())
        return self._held.get(tenant, 0) + seats <= share

    def _has_slot(self, adapter: str | None) -> bool:
        """Whether a request of ``adapter`` runs without swapping an adapter out of a slot."""
        return (
            adapter is None
            or self.slots is None
            or adapter in self._adapters
            or len(self._adapters) < self.slots
        )

    def _take(self, tenant: str, seats: int, start: float, adapter: str | None) -> None:
        self.in_use += seats
        if tenant in self._kept:  # its own seats back, within their grace
            self._kept[tenant] -= min(seats, self._kept[tenant])
        self._held[tenant] += seats
        if adapter is not None:
            self._adapters[adapter] = self._adapters.get(adapter, 0) + seats
        self._virtual_time = max(self._virtual_time, start)

    def _give_up(self, waiter: _Waiter, cost: float) -> None:
        """A waiter leaves without its turn, and is not charged to its tenant's share."""
        waiter.granted.cancel()
        self._unwait(waiter.tenant)
        tenant = waiter.tenant
        self._end_tag[tenant] = max(self._virtual_time, self._end_tag[tenant] - cost)

    def _unwait(self, tenant: str) -> None:
        self._waiting[tenant] -= 1
        if not self._waiting[tenant]:
            del self._waiting[tenant]

    def _dispatch(self) -> None:
        """Let waiters in by start tag. One held back only by the reserve, the shares or (for
        less than ``adapter_wait``) its adapter does not block the waiters behind it (they may
        be light tenants the reserve is for, or of adapters in the engine); one waiting for
        room or, longer, for a slot does, so that no request starves. While a lender waits,
        the others' waiters are passed over: the next seat is the lender's."""
        granted = False
        now = self.clock()
        lenders = self._lenders()
        passed_over = True
        while passed_over:  # once the lenders are in, again for the waiters passed over
            passed_over = False
            for waiter in sorted(self._heap):
                if waiter.granted.done():
                    continue
                if lenders and waiter.tenant not in lenders:
                    passed_over = True
                    continue
                if self.in_use + waiter.seats > self.capacity:
                    break
                if not self._has_slot(waiter.adapter):
                    if now - waiter.since >= self.adapter_wait:
                        break
                    continue
                if self._fits(waiter.tenant, waiter.seats, lenders):
                    self._take(waiter.tenant, waiter.seats, waiter.start, waiter.adapter)
                    self._unwait(waiter.tenant)
                    waiter.granted.set_result(None)
                    granted = True
                    lenders = self._lenders()
            passed_over = passed_over and not lenders
        if granted or any(w.granted.done() for w in self._heap):
            self._heap = [w for w in self._heap if not w.granted.done()]
            heapq.heapify(self._heap)
