"""Which slots of a stacked LoRA weight hold any nonzero value, cached per weight version.

vLLM gives every LoRA layer of the model a slot for every active adapter and zeroes the slot
of each module an adapter does not adapt (``reset_lora``): an adapter of q_proj and v_proj
still owns slots in the k slice and in o, gate, up and down, all zero. Their delta is exactly
zero, so a slice whose A or B is zero in every slot a step uses can be skipped: for q/v
adapters that is 5 of the 7 LoRA slices of each decoder layer.

The flags of a stacked tensor are recomputed when its version counter moves (vLLM writes
adapters into slots in place, which bumps the counter shared by all views of the tensor),
for the slots that ``slot_writes`` says were written (every slot when it does not know).
This module only answers "is it zero"; the plan and the ops decide what to compute.
"""

from __future__ import annotations

import torch

from loraplex.fastlora.slot_writes import SlotWrites, Stamp


class LiveSlots:
    """Per-engine cache: for each stacked weight, which slots are not all zero, and how many
    of each slot's rows (dim -2: A's rank) can be nonzero."""

    def __init__(self, writes: SlotWrites | None = None) -> None:
        self._writes = writes or SlotWrites()
        self._rows: dict[int, tuple[torch.Tensor, int, Stamp, tuple[int, ...]]] = {}

    def rows(
        self, stacked: torch.Tensor, known: dict[int, int] | None = None, fresh: bool = False
    ) -> tuple[int, ...]:
        """Per slot, a bound on its nonzero rows along dim -2: rows from it on are all zero
        (0: the slot is zero). For A, the rank of the adapter in the slot.

        ``known``: the bounds of slots just written, from what was written into them; they
        are not looked at (a full scan, the first time a tensor is seen, looks at every
        slot, unless ``fresh`` says that every other slot is zero as created). The entry
        holds a reference to the tensor, so its address cannot be reused by another tensor
        while it is cached.
        """
        key = stacked.data_ptr()
        version = stacked._version
        hit = self._rows.get(key)
        stamp = self._writes.stamp
        if hit is not None and hit[0].shape == stacked.shape:
            if hit[1] == version:
                return hit[3]
            written = self._writes.changed(hit[2], stacked.shape[0])
            if written is not None:
                rows = list(hit[3])
                for slot in written:
                    bound = known.get(slot) if known else None
                    rows[slot] = _rows_used(stacked[slot : slot + 1])[0] if bound is None else bound
                self._rows[key] = (stacked, version, stamp, tuple(rows))
                return self._rows[key][3]
        if fresh and known:
            rows = tuple(known.get(slot, 0) for slot in range(stacked.shape[0]))
        else:
            rows = tuple(_rows_used(stacked))
        self._rows[key] = (stacked, version, stamp, rows)
        return rows

    def live(
        self, slots: tuple[int, ...], lora_a: torch.Tensor, lora_b: torch.Tensor
    ) -> tuple[int, ...]:
        """The slots of ``slots`` whose A and B are both nonzero (the others add zero).

        B is looked at only when some slot's A is nonzero: most slices of a q/v adapter are
        zero in A, and each look after a load costs a reduction."""
        a = self.rows(lora_a)
        slots = tuple(slot for slot in slots if a[slot])
        if not slots:
            return ()
        b = self.rows(lora_b)
        return tuple(slot for slot in slots if b[slot])

    def bounds(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[frozenset[int], int]:
        """The slots whose A and B are both nonzero, and the rank every slot's A fits in
        (rows from it on are zero in every slot); no slots and 0 where no A is nonzero."""
        a = self.rows(lora_a)
        rank = max(a)
        if not rank:
            return frozenset(), 0
        b = self.rows(lora_b)
        live = frozenset(slot for slot, (r, c) in enumerate(zip(a, b, strict=True)) if r and c)
        return live, rank

    def written(
        self,
        slot: int,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        rank: int | None,
        fresh: bool = False,
    ) -> bool:
        """vLLM has just written ``slot`` of one slice: adapter weights of ``rank`` (0:
        zeros), or it is not known what (None: look). ``fresh``: every other slot is still
        zero as created. Whether the slot is live."""
        if rank is None:
            return bool(self.live((slot,), lora_a, lora_b))
        self.rows(lora_a, {slot: rank}, fresh)
        self.rows(lora_b, {slot: lora_b.shape[-2] if rank else 0}, fresh)
        return rank > 0


def _rows_used(stacked: torch.Tensor) -> list[int]:
    """Per slot of ``stacked`` (``(slots, [1,] rows, cols)``): 1 + its last row with a
    nonzero value, 0 when it has none."""
    used = stacked.reshape(stacked.shape[0], stacked.shape[-2], -1).any(dim=2)
    positions = torch.arange(1, used.shape[1] + 1)
    return (used * positions).amax(dim=1).tolist()
