"""Pure logic of tenancy: who may use what, token buckets, tenant limits, fair admission."""

from __future__ import annotations

import asyncio
import time
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
