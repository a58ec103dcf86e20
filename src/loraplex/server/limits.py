"""Limits checked before any engine work: server-wide request caps and per-tenant rates.

Caps (400): ``max_tokens``, prompt tokens, ``n`` (prompts per request are counted by the
completions route before it tokenizes them). Per tenant (429 with
``Retry-After``): requests per minute and tokens per minute (token buckets that refill
continuously; a request reserves its prompt tokens plus ``max_tokens`` and gets back what it
did not use) and requests in progress. Counters are per server process (under ``serve --ray``,
``ray_limits`` shares them between replicas).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from loraplex.config import Settings
from loraplex.errors import InvalidRequest, RateLimited
from loraplex.server.auth import Caller


def check_caps(settings: Settings, prompt_lengths: list[int], max_tokens: int, n: int) -> None:
    """400 when a request asks more than any tenant may in one request."""
    if n > settings.max_n:
        raise InvalidRequest(f"n is {n}; the limit is {settings.max_n}.")
    if max_tokens > settings.max_tokens_limit:
        raise InvalidRequest(
            f"max_tokens is {max_tokens}; the limit is {settings.max_tokens_limit}."
        )
    longest = max(prompt_lengths, default=0)
    if longest > settings.max_prompt_tokens:
        raise InvalidRequest(
            f"The prompt has {longest} tokens; the limit is {settings.max_prompt_tokens}."
        )


class TokenBucket:
    """``per_minute`` units, refilled continuously; starts full."""

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.capacity = float(per_minute)
        self.tokens = self.capacity
        self.clock = clock
        self.updated = clock()

    def resize(self, per_minute: int) -> None:
        """Follow a changed limit, keeping the level within it."""
        self._refill()
        self.capacity = float(per_minute)
        self.tokens = min(self.tokens, self.capacity)

    def take(self, amount: float) -> float:
        """Take ``amount`` and return 0, or take nothing and return seconds until it fits."""
        self._refill()
        if self.tokens >= amount:
            self.tokens -= amount
            return 0.0
        return (amount - self.tokens) * 60 / self.capacity

    def give_back(self, amount: float) -> None:
        """Return units that were taken but not used."""
        self.tokens = min(self.capacity, self.tokens + amount)

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.capacity / 60)
        self.updated = now


@dataclass
class _TenantState:
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None
    in_progress: int = 0


@dataclass
class Reservation:
    """What one admitted request holds against its tenant's limits until ``release``."""

    state: _TenantState
    reserved_tokens: int
    released: bool = False

    def release(self, used_tokens: int) -> None:
        """Free the concurrency slot and give back the tokens not used (idempotent)."""
        if self.released:
            return
        self.released = True
        self.state.in_progress -= 1
        if self.state.tokens is not None:
            self.state.tokens.give_back(max(0, self.reserved_tokens - used_tokens))


class TenantLimits:
    """Per-tenant requests/min, tokens/min and requests in progress."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._states: dict[str, _TenantState] = {}

    def reserve(self, caller: Caller, tokens: int) -> Reservation:
        """Count a request of ``tokens`` (prompt + max) against ``caller``'s limits, or 429."""
        state = self._state(caller)
        if caller.max_concurrency is not None and state.in_progress >= caller.max_concurrency:
            raise RateLimited(
                f"Tenant '{caller.tenant}' has {state.in_progress} requests in progress, its "
                "limit; retry when one finishes.",
                retry_after=1,
            )
        if state.tokens is not None and tokens > state.tokens.capacity:
            raise InvalidRequest(
                f"This request may use {tokens} tokens, more than tenant '{caller.tenant}' may "
                f"use in a minute ({caller.tpm}); lower max_tokens or shorten the prompt."
            )
        if state.requests is not None and (wait := state.requests.take(1)):
            raise RateLimited(
                f"Tenant '{caller.tenant}' is over its {caller.rpm} requests per minute.",
                retry_after=math.ceil(wait),
            )
        if state.tokens is not None and (wait := state.tokens.take(tokens)):
            if state.requests is not None:
                state.requests.give_back(1)
            raise RateLimited(
                f"Tenant '{caller.tenant}' is over its {caller.tpm} tokens per minute.",
                retry_after=math.ceil(wait),
            )
        state.in_progress += 1
        return Reservation(state, tokens)

    async def acquire(self, caller: Caller, tokens: int) -> Reservation:
        """``reserve`` for the service, which awaits it: a shared implementation
        (``ray_limits``) asks another process."""
        return self.reserve(caller, tokens)

    def _state(self, caller: Caller) -> _TenantState:
        state = self._states.setdefault(caller.tenant, _TenantState())
        state.requests = self._bucket(state.requests, caller.rpm)
        state.tokens = self._bucket(state.tokens, caller.tpm)
        return state

    def _bucket(self, bucket: TokenBucket | None, per_minute: int | None) -> TokenBucket | None:
        if per_minute is None:
            return None
        if bucket is None:
            return TokenBucket(per_minute, self.clock)
        if bucket.capacity != per_minute:
            bucket.resize(per_minute)
        return bucket
