"""Which LoRA slots vLLM wrote since a cache last looked at a stacked weight.

vLLM writes adapter weights into the stacked LoRA tensors in one place only:
``LoRAModelManager.activate_adapter`` (``reset_lora`` / ``set_lora`` of every LoRA module for
one slot). ``activation.watch_activations`` wraps it so that each punica wrapper of the
manager hears which slot was written. The slot's LoRA id alone would not do: vLLM reuses ids
(its warm-up dummy adapters have the ids real adapters get later).

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

Where ``activation.activate_in_one_pass`` cannot write the slot itself, vLLM's loop is made
cheaper by wrapping the layers' ``reset_lora`` and ``set_lora``: they record what each slot
holds (per slice, the rank written there), so a reset of a slot known to be zero is skipped
and an adapter written over a known slot zeroes only what it does not overwrite, instead of
the whole slot.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

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


SlotBounds = tuple[int, ...]
"""What one slot of a layer holds: per slice, how many of A's rows (and B's columns) can be
nonzero, the rank written there. ``()``: every slice is zero."""

_activations: list[set[int]] = []
"""Per activation in progress, the ids of the layers the wrapped ``reset_lora`` and
``set_lora`` wrote into."""


def skip_resets_of_zero_slots(layer_cls: Any) -> None:
    """Wrap ``layer_cls.reset_lora`` (once) so that zeroing a slot that is known to be zero
    does nothing. ``activate_adapter`` resets every module the adapter does not adapt: for
    q/v adapters, o, gate_up and down of every layer, each time, ~1.5 ms a load, and the
    token embedding and the lm_head's logits processor (registry-checked adapters never
    adapt them; ~3 MB a slot each on the bundled model: the logits processor's reset was a
    fifth of an activation's time under load, 32 adapters through 8 slots).

    What each slot holds is known (``_known_slots``) while nothing but these wrappers wrote
    into the layer's stacked tensors: their version counters (which any in-place write
    bumps) are still what they were after the wrappers' last write. Every slot is zero while
    no tensor was ever written into (``zero_as_created``), so the first adapter loaded into
    each slot skips the resets too (~3 ms of its load)."""
    original = layer_cls.reset_lora
    if getattr(original, "_loraplex_skips_zero", False):
        return

    @functools.wraps(original)
    def reset_lora(self: Any, index: int) -> None:
        slots = _known_slots(self)
        if index in slots and not any(slots[index]):
            return
        original(self, index)
        _wrote(self, {**slots, index: ()})

    reset_lora._loraplex_skips_zero = True  # type: ignore[attr-defined]
    layer_cls.reset_lora = reset_lora


def write_over_known_slots(layer_cls: Any) -> None:
    """Wrap ``layer_cls.set_lora`` (once, a linear LoRA layer) so that writing an adapter
    into a slot whose contents are known zeroes only what the new weights do not overwrite.

    vLLM's ``set_lora`` zeroes the whole slot of every slice, then copies the adapter into
    its first rows of A and columns of B: for an adapter of q and v that is ~30 full resets
    of the q/k/v layers an activation, ~1.3 ms of ~3.8 when 32 adapters take turns in 8
    slots. Where the slot held an adapter of the same slices and a rank no higher, nothing
    needs zeroing: the copies overwrite all it held. The result is the same tensors.

    Weights that do not cover their slice's full width (tensor parallel shards, packed
    groups vLLM regroups), and slots whose contents are not known, go through vLLM's
    ``set_lora`` as before; what it wrote is recorded all the same."""
    original = layer_cls.set_lora
    if getattr(original, "_loraplex_tracks", False):
        return

    @functools.wraps(original)
    def set_lora(self: Any, index: int, lora_a: Any, lora_b: Any) -> None:
        slots = _known_slots(self)
        covering = _covering_slices(self, lora_a, lora_b)
        if covering is None or index not in slots:
            original(self, index, lora_a, lora_b)
            self.__dict__.pop("_loraplex_views", None)  # the tensors may be new ones
        else:
            ranks, weights = covering
            for i, (was, rank) in enumerate(
                zip(slots[index] or (0,) * len(ranks), ranks, strict=True)
            ):
                if was > rank:
                    self.lora_a_stacked[i][index, 0, rank:was] = 0
                    self.lora_b_stacked[i][index, 0, :, rank:was] = 0
            for target, source in zip(_slot_views(self, index, ranks), weights, strict=True):
                target.copy_(source)
        others = {slot: held for slot, held in slots.items() if slot != index}
        if covering is not None:
            others[index] = covering[0]
        _wrote(self, others)

    set_lora._loraplex_tracks = True  # type: ignore[attr-defined]
    layer_cls.set_lora = set_lora


def _covering_slices(
    layer: Any, lora_a: Any, lora_b: Any
) -> tuple[SlotBounds, list[torch.Tensor]] | None:
    """``set_lora``'s weights, if each adapted slice's A spans the slot's full input width
    and B its full output height, so that copying them overwrites the slot's first ``rank``
    rows of A and columns of B entirely: the rank of each slice of ``layer`` (0: not
    adapted) and the adapted slices' A and B in turn; None otherwise."""
    if getattr(layer, "tp_size", 1) != 1:
        return None
    a_list = [lora_a] if isinstance(lora_a, torch.Tensor) else list(lora_a)
    b_list = [lora_b] if isinstance(lora_b, torch.Tensor) else list(lora_b)
    if not len(a_list) == len(b_list) == len(layer.lora_a_stacked) == len(layer.lora_b_stacked):
        return None
    ranks: list[int] = []
    weights: list[torch.Tensor] = []
    for a, b, stacked_a, stacked_b in zip(
        a_list, b_list, layer.lora_a_stacked, layer.lora_b_stacked, strict=True
    ):
        if a is None and b is None:
            ranks.append(0)
            continue
        if a is None or b is None or a.dim() != 2 or b.dim() != 2:
            return None
        rank = a.shape[0]
        if a.shape[1] != stacked_a.shape[-1] or b.shape != (stacked_b.shape[-2], rank):
            return None
        if rank > stacked_a.shape[-2]:
            return None
        ranks.append(rank)
        weights += [a, b]
    return tuple(ranks), weights


def _slot_views(layer: Any, index: int, ranks: SlotBounds) -> list[torch.Tensor]:
    """The views of slot ``index`` that adapters of ``ranks`` are copied into: A's first
    rows and B's first columns of each adapted slice, in turn. Cached per layer (each view
    is ~3 us of indexing, ~120 an activation)."""
    views = layer.__dict__.setdefault("_loraplex_views", {})
    key = (index, ranks)
    if key not in views:
        views[key] = [
            view
            for stacked_a, stacked_b, rank in zip(
                layer.lora_a_stacked, layer.lora_b_stacked, ranks, strict=True
            )
            if rank
            for view in (stacked_a[index, 0, :rank], stacked_b[index, 0, :, :rank])
        ]
    return views[key]


def _known_slots(layer: Any) -> dict[int, SlotBounds]:
    """What each slot of ``layer`` is known to hold (slots missing: not known). Nothing is
    known once the stacked tensors were written since the wrappers last wrote them."""
    state = layer.__dict__.get("_loraplex_slots")
    if state is None:
        slots = _as_created(layer)
        layer.__dict__["_loraplex_slots"] = (_versions(layer), slots)
        return slots
    versions, slots = state
    return slots if versions == _versions(layer) else {}


def _wrote(layer: Any, slots: dict[int, SlotBounds]) -> None:
    """The wrappers wrote into ``layer``, which now holds ``slots``."""
    layer.__dict__["_loraplex_slots"] = (_versions(layer), slots)
    if _activations:
        _activations[-1].add(id(layer))


def _tracked(layer: Any) -> bool:
    """Whether every write into ``layer``'s slots goes through the wrappers above."""
    return _tracked_class(type(layer))


@functools.cache
def _tracked_class(cls: type) -> bool:
    """``_tracked`` per class, asked for ~180 layers an activation. The wrappers are put on
    at import (``punica``), before any activation; a class asked before would only stay
    untracked, which names its layers every time, as before."""
    return all(
        getattr(getattr(cls, method, None), mark, False)
        for method, mark in (
            ("reset_lora", "_loraplex_skips_zero"),
            ("set_lora", "_loraplex_tracks"),
        )
    )


def zero_as_created(layer: Any) -> bool:
    """Whether none of ``layer``'s stacked LoRA tensors was ever written into (version 0):
    every slot is then zero, as the pinned vLLM creates them with ``torch.zeros``
    (``create_lora_weights``; a version allocating them with ``torch.empty`` would break
    this). False for a layer without them."""
    if getattr(layer, "lora_a_stacked", None) is None or not hasattr(layer, "lora_b_stacked"):
        return False
    return not any(t._version for t in _stacked(layer))


def _as_created(layer: Any) -> dict[int, SlotBounds]:
    """Every slot of ``layer`` as zero, if it is zero as created (``zero_as_created``)."""
    if not zero_as_created(layer):
        return {}
    return dict.fromkeys(range(_stacked(layer)[0].shape[0]), ())


def _versions(layer: Any) -> tuple[tuple[int, int], ...]:
    """Address and version counter of each stacked LoRA tensor of ``layer``."""
    return tuple((t.data_ptr(), t._version) for t in _stacked(layer))


def _stacked(layer: Any) -> tuple[torch.Tensor, ...]:
    """``layer``'s stacked LoRA tensors: a tuple of slices each for A and B (linear layers),
    or one tensor each (the embedding)."""
    a, b = layer.lora_a_stacked, layer.lora_b_stacked
    return (*a, *b) if isinstance(a, tuple) else (a, b)


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
