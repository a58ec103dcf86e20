"""Which LoRA slots vLLM wrote since a cache last looked at a stacked weight.

vLLM writes adapter weights into the stacked LoRA tensors in one place only:
``LoRAModelManager.activate_adapter``, for one slot. ``activation.watch_activations`` wraps it
so that each punica wrapper of the manager hears which slot was written. The slot's LoRA id
alone would not do: vLLM reuses ids (its warm-up dummy adapters have the ids real adapters get
later).

So when a stacked tensor's version counter has moved, the caches (``live``, ``weights``)
rescan only the slots written since they last looked, instead of every slot of all ~420
stacked tensors after each load. If the counter moved and no write was heard (a write this
module did not see), they rescan every slot, as before. The wrapper also brings its caches
of the written slot up to date right then (``punica.FastPunicaWrapperCPU.slot_written``), so
that the work is done inside ``add_lora`` and not in the next forward step: vLLM activates an
adapter as it adds it (``LRUCacheWorkerLoRAManager.add_adapter``), so a preloaded version's
first request finds its slot ready. Which slices of a layer the adapter has weights for
(``adapted_slices``) also says which are zero, so the zero flags of a written slot are set
without a reduction over every stacked tensor.
"""

from __future__ import annotations

from typing import Any

Stamp = tuple[int, ...]
"""One counter per slot, bumped at each write into that slot."""


class SlotWrites:
    """Per-wrapper count of writes into each slot."""

    def __init__(self) -> None:
        self._stamp: Stamp = ()
        self._changed: dict[tuple[Stamp, int], tuple[int, ...] | None] = {}

    def written(self, slot: int, slots: int) -> None:
        """vLLM has just written ``slot`` (of ``slots``)."""
        stamp = list(self._stamp) if len(self._stamp) == slots else [0] * slots
        stamp[slot] += 1
        self._stamp = tuple(stamp)
        self._changed = {}

    @property
    def stamp(self) -> Stamp:
        return self._stamp

    def changed(self, since: Stamp, slots: int) -> tuple[int, ...] | None:
        """Slots (of ``slots``) written after ``since``; None when unknown (no write heard,
        or stamps that do not cover the tensor's slots): the caller must look at every slot.
        Memoised until the next write: after a load every stacked tensor asks the same."""
        key = (since, slots)
        if key not in self._changed:
            now = self._stamp
            if len(now) != slots or len(since) != slots:
                self._changed[key] = None
            else:
                moved = tuple(slot for slot in range(slots) if now[slot] != since[slot])
                self._changed[key] = moved or None
        return self._changed[key]


def adapted_slices(weights: Any, n_slices: int) -> tuple[int | None, ...]:
    """For each of a layer's ``n_slices``, the rank of the adapter weights ``activate_adapter``
    wrote into it (``weights``, vLLM's ``LoRALayerWeights`` of the layer, or None): 0 where
    it left zeros (``reset_lora``: no weights for the layer, or none for that packed slice),
    None where the layout does not tell (packed weights that vLLM regroups).

    vLLM copies an adapter's A into the first rows of a slot it has zeroed, so rows from the
    rank on stay zero. A rank only says that weights were written, not that they are nonzero:
    the zero flags then count the slice as live without a reduction, which computes an exact
    zero at worst."""
    if not weights:
        return (0,) * n_slices
    lora_a = weights.lora_a
    if not isinstance(lora_a, list):
        # one tensor, split by vLLM across the slices: no slice gets more rows than it has
        return (int(lora_a.shape[0]),) * n_slices
    if len(lora_a) != n_slices:
        return (None,) * n_slices
    return tuple(0 if a is None else int(a.shape[0]) for a in lora_a)
