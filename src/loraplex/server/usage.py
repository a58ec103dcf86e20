"""Usage metering: requests and tokens per tenant and adapter version, for chargeback.

Counted in memory as requests finish and added to the registry database every
``usage_flush_seconds`` (and at shutdown), so a crash loses at most that much. A failed write
keeps the counts for the next flush.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraplex.registry.accounts import Accounts

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (tenant, adapter version or base model name)


class UsageRecorder:
    """Buffers usage in memory and writes it to ``accounts`` periodically."""

    def __init__(self, accounts: Accounts | None, flush_seconds: float) -> None:
        self.accounts = accounts
        self.flush_seconds = flush_seconds
        self._requests: Counter[Key] = Counter()
        self._prompt: Counter[Key] = Counter()
        self._completion: Counter[Key] = Counter()
        self._lock = asyncio.Lock()

    def record(self, tenant: str, adapter: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Count one finished request."""
        key = (tenant, adapter)
        self._requests[key] += 1
        self._prompt[key] += prompt_tokens
        self._completion[key] += completion_tokens

    async def run(self) -> None:
        """Flush forever (cancel to stop)."""
        while True:
            await asyncio.sleep(self.flush_seconds)
            await self.flush()

    async def flush(self) -> None:
        """Write what was counted since the last flush; keep it if the write fails."""
        from loraplex.registry.models import UsageRow

        async with self._lock:
            if self.accounts is None or not self._requests:
                return
            counts = (self._requests, self._prompt, self._completion)
            self._requests, self._prompt, self._completion = Counter(), Counter(), Counter()
            rows = [
                UsageRow(tenant, adapter, counts[0][key], counts[1][key], counts[2][key])
                for key in counts[0]
                for tenant, adapter in [key]
            ]
            try:
                await asyncio.to_thread(self.accounts.record_usage, rows)
            except Exception as exc:
                log.warning("usage not written yet (%s); keeping it for the next flush", exc)
                self._requests.update(counts[0])
                self._prompt.update(counts[1])
                self._completion.update(counts[2])
