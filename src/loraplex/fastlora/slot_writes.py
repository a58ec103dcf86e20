"""Which LoRA slots vLLM wrote since a cache last looked at a stacked weight.

vLLM writes adapter weights into the stacked LoRA tensors in one place only:
``LoRAModelManager.activate_adapter`` (``reset_lora`` / ``set_lora`` of every LoRA module for
one slot). ``watch_activations`` wraps it so that each punica wrapper of the manager hears
which slot was written. The slot's LoRA id alone would not do: vLLM reuses ids (its warm-up
dummy adapters have the ids real adapters get later).

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


def watch_activations(manager_cls: Any) -> None:
    """Wrap ``manager_cls.activate_adapter`` (once) to call ``slot_written(slot, slots, layers)``
    on each of the manager's punica wrappers that has it, after a slot was written; ``layers``
    are ``(layer, weights, fresh)`` for the manager's LoRA layers that use that wrapper (whose
    stacked weights were written), ``weights`` being what vLLM wrote into the layer (None:
    zeros) and ``fresh`` whether every slot of the layer was still zero as created before
    (``zero_as_created``): then only the written slot can hold anything, and the wrapper's
    first look at the layer needs no reduction. Only the manager's first activation says
    ``fresh``: the wrappers have looked at every layer by its end (~0.1 ms a load saved)."""
    original = manager_cls.activate_adapter
    if getattr(original, "_loraplex_watched", False):
        return

    @functools.wraps(original)
    def activate_adapter(self: Any, lora_id: int) -> bool:
        fresh: set[str] = set()
        if not self.__dict__.get("_loraplex_announced"):
            fresh = {name for name, layer in self.modules.items() if zero_as_created(layer)}
        activated = original(self, lora_id)
        if activated and lora_id in self.lora_index_to_id:
            self.__dict__["_loraplex_announced"] = True
            slot = self.lora_index_to_id.index(lora_id)
            adapter = self._registered_adapters[lora_id]
            for wrapper in self.punica_wrapper_mapping.values():
                notify = getattr(wrapper, "slot_written", None)
                if notify is not None:
                    layers = [
                        (layer, self._get_lora_layer_weights(adapter, name), name in fresh)
                        for name, layer in self.modules.items()
                        if getattr(layer, "punica_wrapper", None) is wrapper
                    ]
                    notify(slot, len(self.lora_index_to_id), layers)
        return activated

    activate_adapter._loraplex_watched = True  # type: ignore[attr-defined]
    manager_cls.activate_adapter = activate_adapter


def skip_resets_of_zero_slots(layer_cls: Any) -> None:
    """Wrap ``layer_cls.reset_lora`` (once) so that zeroing a slot that is still zero from its
    last reset does nothing. ``activate_adapter`` resets every module the adapter does not
    adapt: for q/v adapters, o, gate_up and down of every layer, each time, ~1.5 ms a load,
    and the token embedding and the lm_head's logits processor (registry-checked adapters
    never adapt them; ~3 MB a slot each on the bundled model: the logits processor's reset
    was a fifth of an activation's time under load, 32 adapters through 8 slots).

    A slot counts as zero while the layer's stacked tensors are the ones this wrapper last
    zeroed and nothing wrote into them since: their version counters (which any in-place
    write bumps, ``set_lora``'s included) are still what they were after the last reset.
    Every slot counts as zero while no tensor was ever written into (``zero_as_created``),
    so the first adapter loaded into each slot skips the resets too (~3 ms of its load)."""
    original = layer_cls.reset_lora
    if getattr(original, "_loraplex_skips_zero", False):
        return

    @functools.wraps(original)
    def reset_lora(self: Any, index: int) -> None:
        zeroed = self.__dict__.get("_loraplex_zeroed")
        if zeroed is None:
            zeroed = self.__dict__["_loraplex_zeroed"] = _as_created(self)
        if zeroed is not None and zeroed[0] != _versions(self):
            zeroed = None  # written since: no slot is known to be zero
        if zeroed is not None and index in zeroed[1]:
            return
        original(self, index)
        slots = zeroed[1] if zeroed is not None else frozenset()
        self.__dict__["_loraplex_zeroed"] = (_versions(self), slots | {index})

    reset_lora._loraplex_skips_zero = True  # type: ignore[attr-defined]
    layer_cls.reset_lora = reset_lora


def zero_as_created(layer: Any) -> bool:
    """Whether none of ``layer``'s stacked LoRA tensors was ever written into (version 0):
    every slot is then zero, as the pinned vLLM creates them with ``torch.zeros``
    (``create_lora_weights``; a version allocating them with ``torch.empty`` would break
    this). False for a layer without them."""
    if getattr(layer, "lora_a_stacked", None) is None or not hasattr(layer, "lora_b_stacked"):
        return False
    return not any(t._version for t in _stacked(layer))


def _as_created(layer: Any) -> tuple[tuple[tuple[int, int], ...], frozenset[int]] | None:
    """Every slot of ``layer``, zero as created (``zero_as_created``); else None."""
    if not zero_as_created(layer):
        return None
    return _versions(layer), frozenset(range(_stacked(layer)[0].shape[0]))


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
