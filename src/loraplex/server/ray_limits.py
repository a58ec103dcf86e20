"""Tenant limits shared by every Ray Serve replica: one Ray actor holds the counters.

Each replica's ``Service`` normally counts its tenants' requests/min, tokens/min and requests
in progress by itself (``limits.TenantLimits``), so N replicas would let a tenant use N times
its limits. Under ``serve --ray`` each replica asks one named actor instead, which runs the
same ``TenantLimits``: admissions are serialised in that actor, so limits hold exactly across
replicas and machines, at the cost of one actor call per request (and a fire-and-forget call
when it finishes). The actor is detached and restarted by Ray if it dies; it then starts with
full buckets and forgets requests in progress. While it cannot be reached, a replica falls
back to its own counters (per-replica precision) and logs it.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import ray
from ray.exceptions import RayError

from loraplex.errors import LoraplexError
from loraplex.server.auth import Caller
from loraplex.server.limits import Reservation, TenantLimits

log = logging.getLogger("loraplex.server")

ACTOR_NAME = "loraplex-tenant-limits"


@ray.remote(num_cpus=0, max_restarts=-1)
class LimitsActor:
    """``TenantLimits`` for the whole deployment; reservations kept by id until released."""

    def __init__(self) -> None:
        self.limits = TenantLimits()
        self.held: dict[str, Reservation] = {}

    def reserve(self, caller: Caller, tokens: int) -> str | LoraplexError:
        """A reservation id, or the error (429/400) to answer (returned, not raised)."""
        try:
            reservation = self.limits.reserve(caller, tokens)
        except LoraplexError as exc:
            return exc
        key = uuid.uuid4().hex
        self.held[key] = reservation
        return key

    def release(self, key: str, used_tokens: int) -> None:
        reservation = self.held.pop(key, None)
        if reservation is not None:
            reservation.release(used_tokens)


@dataclass
class SharedReservation:
    """A reservation held in the actor; ``release`` is idempotent and does not wait."""

    actor: ray.actor.ActorHandle
    key: str
    released: bool = False

    def release(self, used_tokens: int) -> None:
        if not self.released:
            self.released = True
            self.actor.release.remote(self.key, used_tokens)


class SharedLimits(TenantLimits):
    """The replica's limits: the shared actor's, or this replica's own while it is away."""

    def __init__(self, namespace: str) -> None:
        super().__init__()
        self.actor = LimitsActor.options(
            name=ACTOR_NAME, namespace=namespace, lifetime="detached", get_if_exists=True
        ).remote()

    async def acquire(self, caller: Caller, tokens: int) -> Reservation | SharedReservation:
        try:
            answer = await self.actor.reserve.remote(caller, tokens)
        except RayError as exc:
            log.warning("shared tenant limits unreachable (%s): counting on this replica", exc)
            return self.reserve(caller, tokens)
        if isinstance(answer, LoraplexError):
            raise answer
        return SharedReservation(self.actor, answer)
