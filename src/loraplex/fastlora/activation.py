"""vLLM's ``activate_adapter``, watched for the fast-LoRA caches and done in one pass.

vLLM activates an adapter by calling ``set_lora`` or ``reset_lora`` on each of the model's
~180 LoRA modules for the adapter's slot, and ``set_lora`` zeroes the whole slot before it
copies. When 32 adapters take turns in 8 slots, an activation took ~2 ms, ~4 of them a wave.

``SlotContents`` keeps, per manager, which modules may be nonzero in each slot and the rank
of each of their slices, valid while no stacked tensor was written since (one list of
version counters). An activation then resets only the modules the slot's previous adapter
adapted and this one does not, zeroes only what it leaves of the previous adapter's rows,
and copies the adapter into views of the slot in one ``torch._foreach_copy_``
(``activate_in_one_pass``). The tensors end up as vLLM's loop would leave them. What it cannot
do that way (weights that do not cover their slice, a slot whose contents are not known, a
module kind vLLM treats apart) goes through vLLM's ``activate_adapter``: the manager's first
activation, the warm-up's dummy adapters (they adapt the embedding), writes it did not see.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

SlotBounds = tuple[int, ...]
"""What one slot of a layer holds: per slice, how many of A's rows (and B's columns) can be
nonzero, the rank written there. ``()``: every slice is zero."""

#: Per module an adapter adapts: its slice ranks and A and B in turn (``covering_slices``),
#: or None where its weights do not cover their slices.
AdapterWrites = dict[str, tuple[SlotBounds, list[torch.Tensor]] | None]


@dataclass
class SlotContents:
    """What each slot of a manager's modules holds, while the stacked tensors are unchanged."""

    tensors: list[torch.Tensor]
    """Every stacked LoRA tensor of the manager's modules."""
    versions: list[int]
    """Their version counters when ``held`` was last known to be right."""
    held: dict[int, dict[str, SlotBounds | None]]
    """Per known slot, the modules that may be nonzero there and their slice ranks (None:
    not known how much). Slots missing are not known."""

    def current(self) -> bool:
        return [t._version for t in self.tensors] == self.versions

    def seen(self) -> None:
        """The tensors are as ``held`` says now."""
        self.versions = [t._version for t in self.tensors]


def slot_contents(manager: Any) -> SlotContents:
    """``manager``'s ``SlotContents``, created with every slot zero where no stacked tensor was
    ever written (``zero_as_created``), unknown otherwise."""
    contents = manager.__dict__.get("_loraplex_contents")
    if contents is None:
        layers = [m for m in manager.modules.values() if hasattr(m, "lora_a_stacked")]
        tensors = [t for layer in layers for t in _stacked(layer)]
        fresh = all(zero_as_created(layer) for layer in layers)
        slots = len(manager.lora_index_to_id)
        held = {slot: {} for slot in range(slots)} if fresh else {}
        contents = SlotContents(tensors, [t._version for t in tensors], held)
        manager.__dict__["_loraplex_contents"] = contents
    return contents


def adapter_writes(manager: Any, adapter: Any) -> AdapterWrites:
    """What activating ``adapter`` (vLLM's ``LoRAModel``) writes, per module it adapts;
    kept on the adapter (its weights do not change while it is registered)."""
    writes = adapter.__dict__.get("_loraplex_writes")
    if writes is None:
        writes = {}
        for name, module in manager.modules.items():
            weights = manager._get_lora_layer_weights(adapter, name)
            if weights:
                writes[name] = covering_slices(module, weights.lora_a, weights.lora_b)
        adapter.__dict__["_loraplex_writes"] = writes
    return writes


def one_pass_possible(manager: Any) -> bool:
    """Whether ``manager`` is a vLLM manager whose activations ``activate_in_one_pass`` can do:
    no classification head (vLLM calls its ``set_module_to_save`` too)."""
    possible = manager.__dict__.get("_loraplex_one_pass")
    if possible is None:
        possible = all(
            hasattr(manager, name) for name in ("_active_adapters", "_registered_adapters")
        ) and not any(hasattr(m, "set_module_to_save") for m in manager.modules.values())
        manager.__dict__["_loraplex_one_pass"] = possible
    return possible


def activate_in_one_pass(manager: Any, lora_id: int) -> list[str] | None:
    """Activate ``lora_id`` as vLLM's ``activate_adapter`` does, writing only what changes;
    the names of the modules written. None, having done nothing, where it cannot (vLLM's
    loop must): the adapter is active already, no slot is free, the slot's contents are not
    known, or some weights do not cover their slices."""
    if lora_id in manager._active_adapters or None not in manager.lora_index_to_id:
        return None
    index = manager.lora_index_to_id.index(None)  # vLLM takes the first free slot
    contents = slot_contents(manager)
    before = contents.held.get(index)
    if before is None or not contents.current():
        return None
    adapter = manager._registered_adapters[lora_id]
    writes = adapter_writes(manager, adapter)
    covered = {name: covering for name, covering in writes.items() if covering is not None}
    if len(covered) != len(writes):
        return None
    manager._active_adapters[lora_id] = None
    manager.lora_index_to_id[index] = adapter.id
    modules = manager.modules
    written = [name for name in before if name not in covered]
    for name in written:
        modules[name].reset_lora(index)
    targets: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    for name, (ranks, weights) in covered.items():
        layer = modules[name]
        was = before.get(name, ())
        if was is None:
            layer.reset_lora(index)
        else:
            for i, (old, new) in enumerate(zip(was or (0,) * len(ranks), ranks, strict=True)):
                if old > new:
                    layer.lora_a_stacked[i][index, 0, new:old] = 0
                    layer.lora_b_stacked[i][index, 0, :, new:old] = 0
        targets += _slot_views(layer, index, ranks)
        sources += weights
        written.append(name)
    if targets:
        torch._foreach_copy_(targets, sources)
    contents.held[index] = {name: ranks for name, (ranks, _) in covered.items() if any(ranks)}
    contents.seen()
    return written


def watch_activations(manager_cls: Any) -> None:
    """Wrap ``manager_cls.activate_adapter`` (once): do it in one pass where possible
    (``activate_in_one_pass``), else through vLLM's loop; then call
    ``slot_written(slot, slots, layers)`` on each of the manager's punica wrappers that has
    it. ``layers`` are ``(layer, weights, fresh)`` for the manager's LoRA layers that use that
    wrapper and were written, ``weights`` being what was written into the layer (None:
    zeros) and ``fresh`` whether every slot of the layer was still zero as created before
    (``zero_as_created``): then only the written slot can hold anything, and the wrapper's
    first look at the layer needs no reduction. vLLM's loop writes every layer, and names
    them all; one pass names only the layers it wrote (a q/v adapter over another leaves
    o/gate/up/down as they were). Only the manager's first activation, which goes through
    vLLM's loop, says ``fresh``."""
    original = manager_cls.activate_adapter
    if getattr(original, "_loraplex_watched", False):
        return

    @functools.wraps(original)
    def activate_adapter(self: Any, lora_id: int) -> bool:
        one_pass = one_pass_possible(self)
        if one_pass and lora_id in self._active_adapters:
            return original(self, lora_id)  # in a slot: nothing written (every step asks)
        first = not self.__dict__.get("_loraplex_announced")
        written = None if first or not one_pass else activate_in_one_pass(self, lora_id)
        if written is not None:
            _announce(self, lora_id, [self.modules[name] for name in written], set())
            return True
        fresh = (
            {name for name, layer in self.modules.items() if zero_as_created(layer)}
            if first
            else set()
        )
        known = one_pass and slot_contents(self).current()
        activated = original(self, lora_id)
        if activated and lora_id in self.lora_index_to_id:
            if one_pass:
                _record(self, lora_id, known)
            _announce(self, lora_id, list(self.modules.values()), fresh)
            self.__dict__["_loraplex_announced"] = True
        return activated

    activate_adapter._loraplex_watched = True  # type: ignore[attr-defined]
    manager_cls.activate_adapter = activate_adapter


def _record(manager: Any, lora_id: int, known: bool) -> None:
    """vLLM's loop activated ``lora_id``: its slot now holds the adapter's modules; the other
    slots hold what they did if their contents were ``known`` before, else nothing is known
    of them."""
    contents = slot_contents(manager)
    if not known:
        contents.held.clear()
    slot = manager.lora_index_to_id.index(lora_id)
    writes = adapter_writes(manager, manager._registered_adapters[lora_id])
    contents.held[slot] = {
        name: None if covering is None else covering[0]
        for name, covering in writes.items()
        if covering is None or any(covering[0])
    }
    contents.seen()


def _announce(manager: Any, lora_id: int, layers: list[Any], fresh: set[str]) -> None:
    """Tell each punica wrapper that ``layers`` of it were written in ``lora_id``'s slot."""
    slot = manager.lora_index_to_id.index(lora_id)
    adapter = manager._registered_adapters[lora_id]
    names = _names(manager)
    for wrapper in manager.punica_wrapper_mapping.values():
        notify = getattr(wrapper, "slot_written", None)
        if notify is not None:
            notify(
                slot,
                len(manager.lora_index_to_id),
                [
                    (layer, manager._get_lora_layer_weights(adapter, names[id(layer)]),
                     names[id(layer)] in fresh)
                    for layer in layers
                    if getattr(layer, "punica_wrapper", None) is wrapper
                ],
            )  # fmt: skip


def _names(manager: Any) -> dict[int, str]:
    """Module name by module id, kept on the manager (its modules do not change)."""
    names = manager.__dict__.get("_loraplex_names")
    if names is None or len(names) != len(manager.modules):
        names = {id(module): name for name, module in manager.modules.items()}
        manager.__dict__["_loraplex_names"] = names
    return names


def covering_slices(
    layer: Any, lora_a: Any, lora_b: Any
) -> tuple[SlotBounds, list[torch.Tensor]] | None:
    """An adapter's weights of ``layer``, if each adapted slice's A spans the slot's full
    input width and B its full output height, so that copying them overwrites the slot's
    first ``rank`` rows of A and columns of B entirely: the rank of each slice of ``layer``
    (0: not adapted) and the adapted slices' A and B in turn; None otherwise."""
    if getattr(layer, "tp_size", 1) != 1 or not isinstance(layer.lora_a_stacked, tuple):
        return None  # a shard, or an embedding or the logits (one tensor a side)
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
    is ~3 us of indexing, ~120 an activation); vLLM never replaces the stacked tensors."""
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


def zero_as_created(layer: Any) -> bool:
    """Whether none of ``layer``'s stacked LoRA tensors was ever written into (version 0):
    every slot is then zero, as the pinned vLLM creates them with ``torch.zeros``
    (``create_lora_weights``; a version allocating them with ``torch.empty`` would break
    this). False for a layer without them."""
    if getattr(layer, "lora_a_stacked", None) is None or not hasattr(layer, "lora_b_stacked"):
        return False
    return not any(t._version for t in _stacked(layer))


def _stacked(layer: Any) -> tuple[torch.Tensor, ...]:
    """``layer``'s stacked LoRA tensors: a tuple of slices each for A and B (linear layers),
    or one tensor each (the embedding)."""
    a, b = layer.lora_a_stacked, layer.lora_b_stacked
    return (*a, *b) if isinstance(a, tuple) else (a, b)
