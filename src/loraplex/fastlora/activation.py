"""vLLM's ``activate_adapter``, watched for the fast-LoRA caches and done in one pass.

vLLM activates an adapter by calling ``set_lora`` or ``reset_lora`` on each of the model's
~180 LoRA modules for the adapter's slot. When 32 adapters take turns in 8 slots, that loop
and the per-layer bookkeeping of ``slot_writes``' wrappers are most of an activation's ~2 ms.

``SlotContents`` keeps, per manager, which modules may be nonzero in each slot and the rank
of each of their slices, valid while no stacked tensor was written since (one list of
version counters). An activation then resets only the modules the slot's previous adapter
adapted and this one does not, zeroes only what it leaves of the previous adapter's rows,
and copies the adapter into views of the slot in one ``torch._foreach_copy_``
(``activate_in_one_pass``). The tensors end up as vLLM's loop would leave them. What it cannot
do that way (weights that do not cover their slice, a slot whose contents are not known, a
module kind vLLM treats apart) goes through vLLM's ``activate_adapter`` and its wrappers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from loraplex.fastlora.slot_writes import (
    SlotBounds,
    _activations,
    _covering_slices,
    _slot_views,
    _stacked,
    _tracked,
    zero_as_created,
)

#: Per module an adapter adapts: its slice ranks and A and B in turn (``_covering_slices``),
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
                linear = isinstance(module.lora_a_stacked, tuple)  # not an embedding
                writes[name] = (
                    _covering_slices(module, weights.lora_a, weights.lora_b) if linear else None
                )
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
    it, after a slot was written. ``layers`` are ``(layer, weights, fresh)`` for the
    manager's LoRA layers that use that wrapper and were written (every layer whose writes
    ``slot_writes`` does not track: ``_tracked``), ``weights`` being what vLLM wrote into
    the layer (None: zeros) and ``fresh`` whether every slot of the layer was still zero as
    created before (``zero_as_created``): then only the written slot can hold anything, and
    the wrapper's first look at the layer needs no reduction. Only the manager's first
    activation says ``fresh``, and it names every layer: the wrappers have looked at each by
    its end (~0.1 ms a load saved).

    A layer left as it was (a q/v adapter's o/gate/up/down, zero before and after) is not
    named: its caches are current (~0.15 ms an activation saved, 32 adapters through 8 slots)."""
    original = manager_cls.activate_adapter
    if getattr(original, "_loraplex_watched", False):
        return

    @functools.wraps(original)
    def activate_adapter(self: Any, lora_id: int) -> bool:
        first = not self.__dict__.get("_loraplex_announced")
        one_pass = not first and one_pass_possible(self)
        written = activate_in_one_pass(self, lora_id) if one_pass else None
        if written is not None:
            _announce(self, lora_id, [self.modules[name] for name in written], set())
            return True
        fresh = (
            {name for name, layer in self.modules.items() if zero_as_created(layer)}
            if first
            else set()
        )
        known = one_pass_possible(self) and slot_contents(self).current()
        _activations.append(set())
        try:
            activated = original(self, lora_id)
        finally:
            ids = _activations.pop()
        if activated and lora_id in self.lora_index_to_id:
            if one_pass_possible(self):
                _record(self, lora_id, known)
            layers = [
                layer
                for layer in self.modules.values()
                if first or id(layer) in ids or not _tracked(layer)
            ]
            _announce(self, lora_id, layers, fresh)
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
