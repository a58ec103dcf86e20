"""The hot adapter of one punica wrapper: when to merge it into the base weights, and the switch.

Once per forward step (``step``), before it runs: count the step's tokens per adapter
(``HotPolicy`` decides which one is hot), drop a merge whose slot vLLM wrote or gave away,
unmerge when the hot adapter changes or goes, and go on packing a merge
(``MergedSlot``, ``MERGE_SECONDS_PER_STEP`` a step) until it can be applied. ``slot`` is the
slot served merged; which rows then need which delta is the wrapper's job (``punica``).
Any failure while merging is logged, merging stops, and the step is served unmerged.
"""

from __future__ import annotations

import logging
from typing import Any

from loraplex.fastlora.hot_policy import HotPolicy
from loraplex.fastlora.layer_slices import lora_slices
from loraplex.fastlora.live import LiveSlots
from loraplex.fastlora.merge import MergedSlot, unmergeable
from loraplex.fastlora.slot_writes import SlotWrites

# Under vLLM's logger: its handlers are the ones set up in the engine's processes.
logger = logging.getLogger(f"vllm.{__name__}")

#: Time a step may spend packing a merge (a merge of every projection of the bundled model
#: takes 0.2-0.7 s in all: spread over steps, no request waits that long at once).
MERGE_SECONDS_PER_STEP = 0.03


class HotMerge:
    """Which adapter is served merged into the base weights, switched step by step."""

    def __init__(self, policy: HotPolicy, live: LiveSlots, writes: SlotWrites) -> None:
        self.policy: HotPolicy | None = policy
        """None once merging has stopped for good (a layer that cannot take a merge)."""
        self._live = live
        self._writes = writes
        self._merged: MergedSlot | None = None
        self._merged_as: tuple[int, int] | None = None
        """(LoRA id, write count of its slot) of the merged adapter."""
        self.events: list[tuple[str, int, int]] = []
        """("merge" | "unmerge", LoRA id, step) for each switch, in order."""
        self.steps = 0

    @property
    def slot(self) -> int | None:
        """The slot served merged, if any (a merge still being packed is not served)."""
        return self._merged.slot if self._merged is not None and self._merged.applied else None

    @property
    def lora_id(self) -> int | None:
        """The LoRA id served merged, if any."""
        return None if self.slot is None or self._merged_as is None else self._merged_as[0]

    def set_enabled(self, on: bool) -> None:
        """Turn merging on or off (off unmerges at the next step)."""
        if self.policy is not None:
            self.policy.enabled = on

    def step(
        self, lora_ids: list[int | None], tokens: dict[int | None, int], layers: list[Any]
    ) -> bool:
        """A step with ``tokens`` per LoRA id (None: base) over slots ``lora_ids`` is about
        to run on ``layers``. Returns whether it merged or unmerged (the plans change)."""
        self.steps += 1
        if self.policy is None:
            return False
        switches = len(self.events)
        if self._merged_as is not None and self._merged_as != self._slot_of(
            self._merged_as[0], lora_ids
        ):
            lora_id = self._merged_as[0]
            self._unmerge()  # its slot was written or given to another adapter (or dropped
            # while it was being packed)
            self.policy.forget(lora_id)
        target = self.policy.observe(tokens)
        if self._merged_as is not None and target != self._merged_as[0]:
            self._unmerge()
        if target is not None and self.slot is None:
            self._merge(target, lora_ids, layers)
        return len(self.events) != switches

    def _slot_of(self, lora_id: int, lora_ids: list[int | None]) -> tuple[int, int] | None:
        """(LoRA id, write count of its slot), or None when the adapter has no slot."""
        slot = _index(lora_ids, lora_id)
        return None if slot is None else self._key(lora_id, slot)

    def _key(self, lora_id: int, slot: int) -> tuple[int, int]:
        """(LoRA id, write count of ``slot``): changes when the slot is written again."""
        stamp = self._writes.stamp
        return (lora_id, stamp[slot] if slot < len(stamp) else 0)

    def _merge(self, lora_id: int, lora_ids: list[int | None], layers: list[Any]) -> None:
        """Start merging ``lora_id``, or go on packing it; apply it once every layer is."""
        if self._merged is None:
            slot = _index(lora_ids, lora_id)
            if slot is None:
                return
            merges = self._merges(slot, layers)
            if merges is None:
                return
            self._merged, self._merged_as = MergedSlot(merges, slot), self._key(lora_id, slot)
        merged = self._merged
        try:
            packed = merged.prepare(MERGE_SECONDS_PER_STEP)
            if packed:
                merged.apply()
        except Exception as exc:  # never fail the step: serve unmerged
            self._unmerge()
            self._stop(f"merging LoRA {lora_id} failed: {exc!r}")
            return
        if packed:
            self.events.append(("merge", lora_id, self.steps))
            logger.info(
                "merged LoRA %d into the base weights of %d layers (packed in %.0f ms over %d "
                "steps)",
                lora_id,
                merged.layers,
                merged.packing_seconds * 1e3,
                merged.packing_steps,
            )

    def _merges(self, slot: int, layers: list[Any]) -> list[tuple[Any, list]] | None:
        """``(layer, live slices)`` of each layer where ``slot`` is live; None (and merging
        stopped) when one of them cannot take a merged weight."""
        merges = []
        for layer in layers:
            offset, slices = 0, []
            for index, (lora_a, lora_b, size) in enumerate(lora_slices(layer)):
                if self._live.live((slot,), lora_a, lora_b):
                    slices.append((index, offset, size))
                offset += layer.output_slices[index]
            if slices:
                reason = unmergeable(layer)
                if reason is not None:
                    self._stop(f"a LoRA layer cannot take a merged weight: {reason}")
                    return None
                merges.append((layer, slices))
        return merges

    def _stop(self, why: str) -> None:
        logger.warning("not merging hot adapters any more: %s", why)
        self.policy = None

    def _unmerge(self) -> None:
        """Serve unmerged again (or drop a merge still being packed)."""
        if self._merged is None or self._merged_as is None:
            return
        applied = self._merged.applied
        self._merged.restore()
        if applied:
            self.events.append(("unmerge", self._merged_as[0], self.steps))
            logger.info("unmerged LoRA %d", self._merged_as[0])
        self._merged, self._merged_as = None, None


def _index(lora_ids: list[int | None], lora_id: int) -> int | None:
    """The slot holding ``lora_id``, or None."""
    try:
        return lora_ids.index(lora_id)
    except ValueError:
        return None
