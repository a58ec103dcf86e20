"""When one adapter carries most of the traffic: which adapter to merge into the base weights.

A merged adapter is served at base speed, and every other token pays for a second LoRA (its
own and the merged one's, subtracted), so merging pays while the adapter's share of tokens is
above one half and pays well near all of it. The policy keeps each adapter's share of recent
tokens as an exponential moving average over ``horizon_tokens`` tokens and merges an adapter
whose share reaches ``merge_share``; starting from nothing that takes about 2.3 horizons of
its traffic alone, so a burst does not merge. It unmerges when the share falls below
``unmerge_share`` (hysteresis: a merge costs a repack of the adapted layers, an unmerge
nothing). Pure logic; ``merge`` does the merging.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

#: Shares below this are forgotten (adapters long gone).
FORGET_BELOW = 1e-4


@dataclass
class HotPolicy:
    """Token shares per adapter (LoRA id) and the adapter that should be merged, if any."""

    merge_share: float = 0.9
    unmerge_share: float = 0.6
    horizon_tokens: int = 1024
    enabled: bool = True
    merged: int | None = None
    shares: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.5 < self.unmerge_share < self.merge_share <= 1.0:
            raise ValueError(
                f"need 0.5 < unmerge_share < merge_share <= 1, got unmerge_share="
                f"{self.unmerge_share}, merge_share={self.merge_share}"
            )
        if self.horizon_tokens < 1:
            raise ValueError(f"horizon_tokens must be >= 1, got {self.horizon_tokens}")

    def observe(self, tokens: Mapping[int | None, int]) -> int | None:
        """Count one step's tokens per LoRA id (None: base) and return the id to keep merged
        after it (None: serve unmerged)."""
        total = sum(tokens.values())
        if total > 0:
            keep = math.exp(-total / self.horizon_tokens)
            ids = set(self.shares) | {lora_id for lora_id in tokens if lora_id is not None}
            for lora_id in ids:
                share = tokens.get(lora_id, 0) / total
                updated = keep * self.shares.get(lora_id, 0.0) + (1.0 - keep) * share
                if updated < FORGET_BELOW:
                    self.shares.pop(lora_id, None)
                else:
                    self.shares[lora_id] = updated
        if self.merged is not None and self.shares.get(self.merged, 0.0) < self.unmerge_share:
            self.merged = None
        if not self.enabled:
            self.merged = None
        if self.enabled and self.merged is None and self.shares:
            best = max(self.shares, key=self.shares.__getitem__)
            if self.shares[best] >= self.merge_share:
                self.merged = best
        return self.merged

    def forget(self, lora_id: int) -> None:
        """``lora_id`` left the engine: it is no longer merged and its share starts over."""
        self.shares.pop(lora_id, None)
        if self.merged == lora_id:
            self.merged = None
