"""Who is calling: API key -> tenant, and what that caller may use.

``Authorization: Bearer KEY`` decides the tenant. Keys live (hashed) in the registry database,
so every server sharing it knows the same keys; a lookup is trusted for
``key_cache_seconds``, so a revoked key stops working everywhere within that time. While the
database cannot answer (each lookup waits at most ``registry_timeout_seconds``), a key known
good within ``registry_stale_seconds`` keeps working and any other key is a 503. The admin
key (``LORAPLEX_ADMIN_KEY``) may use everything; with auth off every caller may.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

from loraplex.config import Settings
from loraplex.errors import Forbidden, Unauthorized, Unavailable
from loraplex.registry.accounts import RESERVED_TENANTS
from loraplex.registry.outage import BoundedCaller

if TYPE_CHECKING:
    from loraplex.registry.accounts import Accounts
    from loraplex.registry.models import Tenant

KEY_CACHE_ENTRIES = 10_000


@dataclass(frozen=True)
class Caller:
    """The tenant a request acts for, with its limits (None: unlimited)."""

    tenant: str
    weight: float = 1.0
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    admin: bool = False
    sees_everything: bool = False

    @classmethod
    def of(cls, tenant: Tenant) -> Caller:
        """A tenant's caller."""
        return cls(tenant.name, tenant.weight, tenant.rpm, tenant.tpm, tenant.max_concurrency)

    def may_use(self, owner: str | None) -> bool:
        """Own adapters and shared ones (no owner); everything for admin or auth off."""
        return self.sees_everything or owner is None or owner == self.tenant

    @property
    def cache_salt(self) -> str | None:
        """Keeps this tenant's prompt-cache entries apart from other tenants'."""
        return None if self.sees_everything else f"tenant:{self.tenant}"


ADMIN = Caller(RESERVED_TENANTS[0], admin=True, sees_everything=True)
ANONYMOUS = Caller(RESERVED_TENANTS[1], sees_everything=True)


def bearer_key(request: Request) -> str | None:
    """The key of ``Authorization: Bearer KEY``, or None."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return (key.strip() or None) if scheme.lower() == "bearer" else None


def same_key(sent: str, expected: str | None) -> bool:
    """Constant-time comparison with a configured key."""
    if not expected:
        return False
    return hmac.compare_digest(sent.encode(), expected.encode())


class Authenticator:
    """Turns a request's key into a ``Caller``; caches lookups for ``key_cache_seconds``."""

    def __init__(self, settings: Settings, accounts: Accounts | None) -> None:
        self.settings = settings
        self.accounts = accounts
        self._database = BoundedCaller(
            "The registry database (API keys)",
            settings.registry_timeout_seconds,
            settings.registry_retry_seconds,
        )
        self._cache: OrderedDict[str, tuple[float, Tenant | None]] = OrderedDict()
        """Key digest -> (when it was looked up, its tenant or None)."""

    async def caller(self, request: Request) -> Caller:
        """The caller of an API request (401 without a valid key when auth is on)."""
        key = bearer_key(request)
        if key is not None and same_key(key, self.settings.admin_key):
            return ADMIN
        if self.settings.auth == "off":
            return ANONYMOUS
        if key is None:
            raise Unauthorized(
                "This server needs an API key: send 'Authorization: Bearer KEY' "
                "(an operator creates one with `loraplex keys create TENANT`)."
            )
        tenant = await self._lookup(key)
        if tenant is None:
            raise Unauthorized("The API key is not valid: unknown or revoked.")
        return Caller.of(tenant)

    async def require_admin(self, request: Request) -> None:
        """401 without the admin key, 403 for a tenant's key."""
        if not self.settings.admin_key:
            raise Unauthorized("Admin routes are disabled: set LORAPLEX_ADMIN_KEY to enable them.")
        key = bearer_key(request)
        if key is None or not same_key(key, self.settings.admin_key):
            await self._refuse(key, "Admin routes need 'Authorization: Bearer <admin key>'.")

    async def require_metrics(self, request: Request) -> None:
        """With auth on, /metrics needs the admin key or the metrics key."""
        if self.settings.auth == "off":
            return
        key = bearer_key(request)
        allowed = (self.settings.admin_key, self.settings.metrics_key)
        if key is None or not any(same_key(key, expected) for expected in allowed):
            await self._refuse(
                key, "/metrics needs 'Authorization: Bearer <admin or metrics key>'."
            )

    async def _refuse(self, key: str | None, message: str) -> None:
        """403 for a valid tenant key (it may not go here), else 401."""
        if key is not None and self.settings.auth == "on" and await self._lookup(key) is not None:
            raise Forbidden(message)
        raise Unauthorized(message)

    async def _lookup(self, key: str) -> Tenant | None:
        digest = _digest(key)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and now - cached[0] < self.settings.key_cache_seconds:
            return cached[1]
        if self.accounts is None:
            return None
        accounts = self.accounts
        try:
            tenant = await asyncio.to_thread(
                self._database.call, lambda: accounts.authenticate(key)
            )
        except Unavailable as exc:
            stale_ok = cached is not None and cached[1] is not None
            if stale_ok and now - cached[0] < self.settings.registry_stale_seconds:
                return cached[1]  # last known good while the database is down
            raise Unavailable(
                f"The API key cannot be checked now: {exc.message} Retry shortly.",
                retry_after=exc.retry_after,
            ) from exc
        self._cache[digest] = (now, tenant)
        self._cache.move_to_end(digest)
        while len(self._cache) > KEY_CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return tenant


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
