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
    """Per-engine cache: for each stacked weight, which slots are not all zero."""

    def __init__(self, writes: SlotWrites | None = None) -> None:
        self._writes = writes or SlotWrites()
        self._flags: dict[int, tuple[torch.Tensor, int, Stamp, tuple[bool, ...]]] = {}

    def flags(
        self, stacked: torch.Tensor, known: dict[int, bool] | None = None
    ) -> tuple[bool, ...]:
        """One bool per slot (dim 0 of ``stacked``): True where the slot holds a nonzero value.

        ``known``: the flags of slots just written, from what was written into them; they are
        not looked at (a full scan, the first time a tensor is seen, looks at every slot).
        The entry holds a reference to the tensor, so its address cannot be reused by
        another tensor while it is cached.
        """
        key = stacked.data_ptr()
        version = stacked._version
        hit = self._flags.get(key)
        stamp = self._writes.stamp
        if hit is not None and hit[0].shape == stacked.shape:
            if hit[1] == version:
                return hit[3]
            written = self._writes.changed(hit[2], stacked.shape[0])
            if written is not None:
                flags = list(hit[3])
                for slot in written:
                    flag = known.get(slot) if known else None
                    flags[slot] = bool(stacked[slot].any()) if flag is None else flag
                self._flags[key] = (stacked, version, stamp, tuple(flags))
                return self._flags[key][3]
        flags = tuple(stacked.reshape(stacked.shape[0], -1).any(dim=1).tolist())
        self._flags[key] = (stacked, version, stamp, flags)
        return flags

    def live(
        self, slots: tuple[int, ...], lora_a: torch.Tensor, lora_b: torch.Tensor
    ) -> tuple[int, ...]:
        """The slots of ``slots`` whose A and B are both nonzero (the others add zero).

        B is looked at only when some slot's A is nonzero: most slices of a q/v adapter are
        zero in A, and each look after a load costs a reduction."""
        a = self.flags(lora_a)
        slots = tuple(slot for slot in slots if a[slot])
        if not slots:
            return ()
        b = self.flags(lora_b)
        return tuple(slot for slot in slots if b[slot])

    def written(
        self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, adapted: bool | None
    ) -> bool:
        """vLLM has just written ``slot`` of one slice: adapter weights (``adapted``), zeros
        (not ``adapted``), or it is not known which (None: look). Whether the slot is live."""
        if adapted is None:
            return bool(self.live((slot,), lora_a, lora_b))
        self.flags(lora_a, {slot: adapted})
        self.flags(lora_b, {slot: adapted})
        return adapted
