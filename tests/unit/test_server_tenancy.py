"""Pure logic of tenancy: who may use what, token buckets, tenant limits, fair admission."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from datetime import UTC, datetime

import pytest

from loraplex.config import Settings
from loraplex.errors import InvalidRequest, RateLimited, Unavailable
from loraplex.registry.models import Tenant
from loraplex.server.admission import FairAdmission
from loraplex.server.auth import ADMIN, ANONYMOUS, Authenticator, Caller
from loraplex.server.limits import TenantLimits, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_callers_may_use_their_own_and_shared_adapters() -> None:
    acme = Caller("acme")
    assert acme.may_use("acme") and acme.may_use(None) and not acme.may_use("globex")
    assert ADMIN.may_use("globex") and ANONYMOUS.may_use("globex")
    assert acme.cache_salt == "tenant:acme" != Caller("globex").cache_salt


def test_token_bucket_refills_continuously() -> None:
    clock = Clock()
    bucket = TokenBucket(60, clock)
    assert bucket.take(60) == 0
    assert bucket.take(1) == pytest.approx(1.0)  # one unit per second
    clock.now = 0.5
    assert bucket.take(1) == pytest.approx(0.5)
    clock.now = 10
    assert bucket.take(10) == 0 and bucket.take(1) > 0
    bucket.give_back(5)
    assert bucket.take(5) == 0


def test_requests_per_minute_gives_429_with_retry_after() -> None:
    clock = Clock()
    limits = TenantLimits(clock)
    acme = Caller("acme", rpm=2)
    for _ in range(2):
        limits.reserve(acme, 10).release(10)
    with pytest.raises(RateLimited, match="2 requests per minute") as refused:
        limits.reserve(acme, 10)
    assert refused.value.retry_after == 30
    limits.reserve(Caller("globex", rpm=2), 10)  # other tenants are not affected
    clock.now = 30
    limits.reserve(acme, 10)


def test_tokens_per_minute_reserves_and_gives_back_unused() -> None:
    clock = Clock()
    limits = TenantLimits(clock)
    acme = Caller("acme", tpm=100)
    first = limits.reserve(acme, 80)
    with pytest.raises(RateLimited, match="100 tokens per minute") as refused:
        limits.reserve(acme, 30)
    assert refused.value.retry_after == 6  # 10 tokens short at 100/60 per second
    first.release(used_tokens=20)  # 60 unused tokens come back
    limits.reserve(acme, 70)
    with pytest.raises(InvalidRequest, match="more than tenant 'acme' may use in a minute"):
        limits.reserve(acme, 101)


def test_a_refused_request_costs_no_request_quota() -> None:
    limits = TenantLimits(Clock())
    acme = Caller("acme", rpm=2, tpm=10)
    limits.reserve(acme, 10)
    with pytest.raises(RateLimited, match="tokens per minute"):
        limits.reserve(acme, 5)
    limits.reserve(Caller("acme", rpm=2), 0)  # the rpm unit of the refused one came back


def test_concurrency_limit_counts_requests_in_progress() -> None:
    limits = TenantLimits(Clock())
    acme = Caller("acme", max_concurrency=2)
    held = [limits.reserve(acme, 1), limits.reserve(acme, 1)]
    with pytest.raises(RateLimited, match="2 requests in progress"):
        limits.reserve(acme, 1)
    held[0].release(1)
    held[0].release(1)  # idempotent: does not free a second slot
    limits.reserve(acme, 1)
    with pytest.raises(RateLimited):
        limits.reserve(acme, 1)


def test_changed_limits_apply_to_the_next_request() -> None:
    limits = TenantLimits(Clock())
    limits.reserve(Caller("acme", rpm=1), 1)
    with pytest.raises(RateLimited):
        limits.reserve(Caller("acme", rpm=1), 1)
    limits.reserve(Caller("acme", rpm=None), 1)


def run_admission(plan: list[tuple[str, float]], capacity: int = 1) -> list[str]:
    """Submit ``plan`` (tenant, weight) while the engine is full; return the grant order."""

    async def main() -> list[str]:
        admission = FairAdmission(capacity, queue_size=100, timeout=30)
        granted: list[str] = []
        holders = ["holder"] * await admission.acquire("holder", 1, capacity, 1)

        async def request(tenant: str, weight: float) -> None:
            await admission.acquire(tenant, weight, 1, 100)
            granted.append(tenant)
            holders.append(tenant)

        tasks = [asyncio.create_task(request(t, w)) for t, w in plan]
        await asyncio.sleep(0)
        for _ in range(len(plan) + 1):
            admission.release(holders.pop(0), 1)
            for _ in range(3):
                await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        return granted

    return asyncio.run(main())


def test_a_quiet_tenant_goes_before_a_flood() -> None:
    order = run_admission([("flood", 1)] * 20 + [("quiet", 1)])
    assert order.index("quiet") <= 1


def test_weights_share_the_engine_two_to_one() -> None:
    order = run_admission([("heavy", 2), ("light", 1)] * 30)
    first = order[:30]
    assert first.count("heavy") == 20 and first.count("light") == 10


def admission_holder(admission: FairAdmission) -> str:
    """Some tenant that holds a seat now."""
    return next(iter(admission._held))


def test_a_full_queue_is_429_and_others_still_queue() -> None:
    async def main() -> None:
        admission = FairAdmission(1, queue_size=2, timeout=30)
        await admission.acquire("holder", 1, 1, 1)
        waiting = [asyncio.create_task(admission.acquire("flood", 1, 1, 1)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(RateLimited, match="2 requests waiting"):
            await admission.acquire("flood", 1, 1, 1)
        other = asyncio.create_task(admission.acquire("quiet", 1, 1, 1))
        await asyncio.sleep(0)
        assert admission.waiting("quiet") == 1
        for _ in range(3):
            admission.release(admission_holder(admission), 1)
            for _ in range(3):
                await asyncio.sleep(0)
        await asyncio.wait_for(asyncio.gather(*waiting, other), 5)

    asyncio.run(main())


def test_waiting_too_long_is_429_and_frees_the_place() -> None:
    async def main() -> None:
        admission = FairAdmission(1, queue_size=5, timeout=0.05)
        await admission.acquire("holder", 1, 1, 1)
        with pytest.raises(RateLimited, match="waited") as refused:
            await admission.acquire("acme", 1, 1, 1)
        assert refused.value.retry_after and admission.waiting() == 0
        admission.release("holder", 1)
        assert admission.in_use == 0
        await admission.acquire("acme", 1, 1, 1)
        assert admission.in_use == 1

    asyncio.run(main())


def test_a_cancelled_waiter_leaves_no_seat_taken() -> None:
    async def main() -> None:
        admission = FairAdmission(1, queue_size=5, timeout=30)
        await admission.acquire("holder", 1, 1, 1)
        waiter = asyncio.create_task(admission.acquire("acme", 1, 1, 1))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        admission.release("holder", 1)
        assert admission.in_use == 0 and admission.waiting() == 0

    asyncio.run(main())


def test_a_request_that_timed_out_is_not_charged() -> None:
    async def main() -> None:
        admission = FairAdmission(1, queue_size=5, timeout=0.05)
        await admission.acquire("holder", 1, 1, 1)
        with pytest.raises(RateLimited):
            await admission.acquire("acme", 1, 1, 10_000)
        admission.timeout = 30
        acme = asyncio.create_task(admission.acquire("acme", 1, 1, 100))
        other = asyncio.create_task(admission.acquire("other", 1, 1, 100))
        await asyncio.sleep(0)
        admission.release("holder", 1)
        await asyncio.wait_for(acme, 5)
        assert not other.done()  # acme's timed-out request cost it nothing: acme went first
        admission.release("acme", 1)
        await asyncio.wait_for(other, 5)

    asyncio.run(main())


def test_a_waiter_that_fits_goes_in_at_once() -> None:
    async def main() -> None:
        admission = FairAdmission(2, queue_size=5, timeout=30)
        admission.release("big", await admission.acquire("big", 1, 1, 100))  # big's tag: later
        await admission.acquire("holder", 1, 1, 1)
        big = asyncio.create_task(admission.acquire("big", 1, 2, 100))  # needs both seats
        await asyncio.sleep(0)
        # quiet's tag is earliest and one seat is free: it must not wait for holder
        assert await asyncio.wait_for(admission.acquire("quiet", 1, 1, 1), 1) == 1
        assert admission.in_use == 2 and admission.waiting("big") == 1
        admission.release("holder", 1)
        admission.release("quiet", 1)
        assert await big == 2

    asyncio.run(main())


def test_reserved_seats_let_a_light_tenant_start_beside_a_flood() -> None:
    async def main() -> None:
        admission = FairAdmission(4, queue_size=10, timeout=30, reserve=1)
        flood = [asyncio.create_task(admission.acquire("flood", 1, 1, 100)) for _ in range(6)]
        await asyncio.sleep(0)
        assert admission.in_use == 3 and admission.waiting("flood") == 3  # one seat kept
        quiet = await asyncio.wait_for(admission.acquire("quiet", 1, 1, 10), 1)
        assert quiet == 1 and admission.in_use == 4
        other = asyncio.create_task(admission.acquire("other", 1, 1, 10))
        await asyncio.sleep(0)
        assert not other.done()  # the reserve is used up; others wait their turn
        admission.release("quiet", 1)
        await asyncio.wait_for(other, 1)  # a light tenant, next by tag, gets the seat
        admission.release("flood", 1)
        await asyncio.sleep(0)
        assert admission.in_use == 3 and admission.waiting("flood") == 3  # one seat stays free
        for task in flood:
            task.cancel()

    asyncio.run(main())


def test_a_lone_tenant_with_a_large_request_still_runs() -> None:
    async def main() -> None:
        admission = FairAdmission(4, queue_size=10, timeout=30, reserve=1)
        assert await asyncio.wait_for(admission.acquire("acme", 1, 8, 100), 1) == 3

    asyncio.run(main())


async def flood(admission: FairAdmission, tenant: str, count: int, weight: float = 1) -> list:
    """``count`` one-seat requests of ``tenant``, queued (or let in) before this returns."""
    tasks = [asyncio.create_task(admission.acquire(tenant, weight, 1, 100)) for _ in range(count)]
    await asyncio.sleep(0)
    return tasks


def test_a_flood_holds_its_share_while_a_light_tenant_is_active() -> None:
    async def main() -> None:
        clock = Clock()
        admission = FairAdmission(8, queue_size=20, timeout=30, reserve=1, idle=5, clock=clock)
        assert await admission.acquire("quiet", 1, 1, 10) == 1
        flooding = await flood(admission, "flood", 10)
        # shares of the 7 unreserved seats, 1:1: the flood holds 3, 4 seats stay free
        assert admission.held() == {"quiet": 1, "flood": 3} and admission.waiting("flood") == 7
        admission.release("quiet", 1)
        admission.release("flood", 1)  # quiet is still active (idle < 5 s): its share is kept
        assert admission.held() == {"flood": 3}
        clock.now += 1
        # quiet's next request queues behind the flood's waiters, starts at once, and its
        # short wait does not count as wanting more: the flood keeps to its share
        assert await asyncio.wait_for(admission.acquire("quiet", 1, 1, 10), 1) == 1
        assert admission.held() == {"quiet": 1, "flood": 3}
        admission.release("quiet", 1)
        clock.now += 5.1  # quiet gone: the flood alone may fill the unreserved seats
        admission.release("flood", 1)
        assert admission.held() == {"flood": 7} and admission.in_use == 7
        for task in flooding:
            task.cancel()

    asyncio.run(main())


def test_shares_follow_weights_and_busy_tenants_split_theirs_by_the_queue() -> None:
    async def main() -> None:
        admission = FairAdmission(12, queue_size=50, timeout=30)
        await admission.acquire("quiet", 1, 1, 10)
        heavy = await flood(admission, "heavy", 40, weight=2)
        assert admission.held()["heavy"] == 8  # 12 x 2/3: the quiet tenant keeps 4
        light = await flood(admission, "light", 40)
        assert admission.held() == {"quiet": 1, "heavy": 8, "light": 1}  # 9 = 12 x 3/4
        running = deque(["heavy"] * 8 + ["light"])  # requests end in the order they started
        admitted = {"heavy": 0, "light": 0}
        for _ in range(18):
            before = admission.held()
            done = running.popleft()
            admission.release(done, 1)
            after = admission.held()
            (next_in,) = [t for t in admitted if after[t] - before[t] + (t == done) == 1]
            admitted[next_in] += 1
            running.append(next_in)
        assert admitted == {"heavy": 12, "light": 6}  # the freed seats go 2:1 by tag
        assert admission.held() == {"quiet": 1, "heavy": 6, "light": 3}
        for task in heavy + light:
            task.cancel()

    asyncio.run(main())


def test_a_request_larger_than_its_share_runs_once_its_tenant_holds_none() -> None:
    async def main() -> None:
        admission = FairAdmission(8, queue_size=10, timeout=30)
        await admission.acquire("quiet", 1, 1, 10)
        await admission.acquire("flood", 1, 2, 100)
        big = asyncio.create_task(admission.acquire("flood", 1, 6, 100))  # share: 4
        await asyncio.sleep(0)
        assert not big.done() and admission.in_use == 3
        admission.release("flood", 2)
        assert await asyncio.wait_for(big, 1) == 6 and admission.in_use == 7

    asyncio.run(main())


def test_shares_off_lend_every_seat() -> None:
    async def main() -> None:
        admission = FairAdmission(8, queue_size=20, timeout=30, reserve=1, shared=0)
        await admission.acquire("quiet", 1, 1, 10)
        flooding = await flood(admission, "flood", 10)
        assert admission.held() == {"quiet": 1, "flood": 6}  # all but the reserve
        for task in flooding:
            task.cancel()

    asyncio.run(main())


def test_lending_lets_a_flood_borrow_unused_shares_up_to_lend() -> None:
    async def main() -> None:
        for lend, flood_holds in [(0, 3), (2, 5), (8, 6)]:
            admission = FairAdmission(8, queue_size=20, timeout=30, reserve=1, lend=lend)
            await admission.acquire("quiet", 1, 1, 10)
            flooding = await flood(admission, "flood", 10)
            # share 3.5 of the 7 unreserved seats, plus up to ``lend`` of quiet's unused part
            assert admission.held() == {"quiet": 1, "flood": flood_holds}, lend
            for task in flooding:
                task.cancel()

    asyncio.run(main())


def test_a_lender_gets_the_next_seat_and_borrowed_seats_come_back_as_requests_end() -> None:
    async def main() -> None:
        admission = FairAdmission(8, queue_size=20, timeout=30, reserve=1, lend=8, grace=0.05)
        await admission.acquire("quiet", 1, 1, 10_000)  # its next requests' tags come last
        flooding = await flood(admission, "flood", 10)
        assert admission.held() == {"quiet": 1, "flood": 6}  # all the unreserved seats
        more = [asyncio.create_task(admission.acquire("quiet", 1, 1, 10)) for _ in range(3)]
        await asyncio.sleep(0)
        assert admission.waiting("quiet") == 3 and admission.in_use == 7  # none aborted
        for held in (2, 3):
            admission.release("flood", 1)  # the freed seat is quiet's, not the flood's
            assert admission.held() == {"quiet": held, "flood": 7 - held}
            assert admission.waiting("flood") == 4
        # quiet holds 3 of its 3.5: a fourth seat would be borrowed, so the queue decides
        # (the flood's tags come first)
        admission.release("flood", 1)
        assert admission.held() == {"quiet": 3, "flood": 4} and admission.waiting("quiet") == 1
        admission.release("quiet", 1)  # quiet's waiter fits in its share again: it goes in
        assert admission.held() == {"quiet": 3, "flood": 4} and admission.waiting("quiet") == 0
        admission.release("quiet", 3)  # kept for quiet a moment, then the flood borrows
        assert admission.held() == {"flood": 4}
        await asyncio.sleep(0.1)
        assert admission.held() == {"flood": 7}
        assert await asyncio.wait_for(asyncio.gather(*more), 1) == [1, 1, 1]
        for task in flooding:
            task.cancel()

    asyncio.run(main())


def test_a_lender_holding_none_goes_before_a_borrower_with_an_earlier_tag() -> None:
    async def main() -> None:
        admission = FairAdmission(3, queue_size=20, timeout=30, lend=3)  # no reserve
        await admission.acquire("quiet", 1, 1, 10_000)
        admission.release("quiet", 1)
        await admission.acquire("other", 1, 1, 10)
        flooding = await flood(admission, "flood", 6)
        assert admission.held() == {"other": 1, "flood": 2}  # borrowed: its share is 1
        quiet = asyncio.create_task(admission.acquire("quiet", 1, 1, 10))
        await asyncio.sleep(0)
        assert not quiet.done()  # the engine is full
        admission.release("flood", 1)
        await asyncio.wait_for(quiet, 1)
        assert admission.held() == {"other": 1, "flood": 1, "quiet": 1}
        for task in flooding:
            task.cancel()

    asyncio.run(main())


def test_a_lender_held_back_for_an_adapter_slot_does_not_stop_borrowers() -> None:
    async def main() -> None:
        clock = Clock()
        admission = FairAdmission(8, 20, 30, reserve=1, lend=8, slots=1, clock=clock)
        await admission.acquire("quiet", 1, 1, 10)
        admission.release("quiet", 1)  # quiet is active: the flood's share is 3.5
        for _ in range(4):
            await asyncio.wait_for(admission.acquire("flood", 1, 1, 10, "a@v1"), 1)
        quiet = asyncio.create_task(admission.acquire("quiet", 1, 1, 10, "q@v1"))
        await asyncio.sleep(0)
        assert not quiet.done()  # held back: its adapter would swap the flood's out
        assert await asyncio.wait_for(admission.acquire("flood", 1, 1, 10, "a@v1"), 1) == 1
        assert admission.held() == {"flood": 5}
        quiet.cancel()

    asyncio.run(main())


def test_requests_of_adapters_in_the_engine_go_first() -> None:
    async def main() -> None:
        admission = FairAdmission(8, queue_size=10, timeout=30, slots=2, clock=Clock())
        await admission.acquire("acme", 1, 1, 10, "a@v1")
        await admission.acquire("acme", 1, 1, 10, "b@v1")
        third = asyncio.create_task(admission.acquire("globex", 1, 1, 10, "c@v1"))
        await asyncio.sleep(0)
        assert not third.done()  # both slots are taken: it would swap one out
        # requests of adapters in the engine, and of the base model, do not wait behind it
        assert await asyncio.wait_for(admission.acquire("other", 1, 1, 10, "a@v1"), 1) == 1
        assert await asyncio.wait_for(admission.acquire("other", 1, 1, 10), 1) == 1
        assert admission.adapters() == {"a@v1": 2, "b@v1": 1}
        admission.release("acme", 1, "b@v1")  # b's slot is free: c goes in
        assert await asyncio.wait_for(third, 1) == 1
        assert admission.adapters() == {"a@v1": 2, "c@v1": 1}

    asyncio.run(main())


def test_an_adapter_held_back_past_adapter_wait_goes_in_next() -> None:
    async def main() -> None:
        clock = Clock()
        admission = FairAdmission(8, 10, 30, slots=2, adapter_wait=2, clock=clock)
        await admission.acquire("acme", 1, 1, 10, "a@v1")
        await admission.acquire("acme", 1, 1, 10, "b@v1")
        third = asyncio.create_task(admission.acquire("globex", 1, 1, 10, "c@v1"))
        await asyncio.sleep(0)
        clock.now += 2.1  # it waited long enough: now the queue waits for it
        more = asyncio.create_task(admission.acquire("other", 1, 1, 10, "a@v1"))
        await asyncio.sleep(0)
        assert not third.done() and not more.done()
        admission.release("acme", 1, "a@v1")  # a slot frees: c first, then a again
        assert await asyncio.wait_for(third, 1) == 1
        await asyncio.wait_for(admission.acquire("acme", 1, 1, 10, "b@v1"), 1)
        assert not more.done()  # b and c hold both slots
        admission.release("acme", 2, "b@v1")
        assert await asyncio.wait_for(more, 1) == 1
        assert admission.adapters() == {"c@v1": 1, "a@v1": 1}

    asyncio.run(main())


class FlakyAccounts:
    """Accounts whose database can be switched off; counts lookups."""

    def __init__(self, tenant: Tenant) -> None:
        self.tenant = tenant
        self.down = False
        self.lookups = 0

    def authenticate(self, key: str) -> Tenant | None:
        self.lookups += 1
        if self.down:
            raise Unavailable("The registry database cannot be read: connection refused")
        return self.tenant if key == "good" else None


def test_known_keys_keep_working_through_a_registry_outage(monkeypatch) -> None:
    tenant = Tenant("acme", 1.0, None, None, None, datetime.now(UTC))
    accounts = FlakyAccounts(tenant)
    settings = Settings(auth="on", key_cache_seconds=0, registry_retry_seconds=0.001)
    auth = Authenticator(settings, accounts)  # type: ignore[arg-type]
    real_sleep = time.sleep
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])

    assert asyncio.run(auth._lookup("good")) == tenant
    accounts.down = True
    clock[0] += 60
    assert asyncio.run(auth._lookup("good")) == tenant  # last known good
    with pytest.raises(Unavailable, match="API key cannot be checked now"):
        asyncio.run(auth._lookup("never-seen"))  # 503, not 401: the key may be valid
    clock[0] += settings.registry_stale_seconds
    with pytest.raises(Unavailable):
        asyncio.run(auth._lookup("good"))  # staleness is bounded
    accounts.down = False
    real_sleep(0.01)  # past the outage's retry interval
    assert asyncio.run(auth._lookup("good")) == tenant
    assert asyncio.run(auth._lookup("bad")) is None


def test_a_wave_of_ends_leaves_each_tenant_its_share_for_its_next_requests() -> None:
    """Equal-length requests that start together end together; the waiting borrower gets
    only the seats above the returning tenant's share, then they come back as its next
    requests arrive (``grace``), or go to the borrower once the grace is over."""

    async def main(grace: float) -> dict[str, int]:
        admission = FairAdmission(16, queue_size=20, timeout=30, reserve=2, grace=grace, lend=16)
        for _ in range(14):  # alone: heavy takes all the unreserved seats
            await admission.acquire("heavy", 2, 1, 100)
        light = await flood(admission, "light", 16)
        assert admission.held() == {"heavy": 14, "light": 1}  # a reserved seat
        for _ in range(14):  # the wave ends before heavy's next requests arrive
            admission.release("heavy", 1)
        await asyncio.sleep(0)
        after_wave = admission.held()
        heavy = await flood(admission, "heavy", 16, weight=2)  # 14 clients come back
        await asyncio.sleep(0.01)
        back = admission.held()
        for task in light + heavy:
            task.cancel()
        return {"light after the wave": after_wave["light"], "heavy back": back["heavy"]}

    # shares of the 14 unreserved seats 2:1: heavy 9.3, light 4.7; heavy keeps 9
    assert asyncio.run(main(grace=5.0)) == {"light after the wave": 5, "heavy back": 9}
    # without it the borrower takes every unreserved seat; heavy gets back a reserved one
    assert asyncio.run(main(grace=0)) == {"light after the wave": 14, "heavy back": 1}
