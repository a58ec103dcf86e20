"""An activation in one pass leaves every slot as vLLM's loop over every module would."""

from __future__ import annotations

import inspect
import random

import pytest
import torch
from test_fastlora_slot_writes import Listener

from loraplex.fastlora.activation import watch_activations

pytest.importorskip("vllm")

from vllm.lora.lora_model import LoRAModel  # noqa: E402
from vllm.lora.lora_weights import LoRALayerWeights  # noqa: E402
from vllm.lora.model_manager import LoRAModelManager  # noqa: E402

MODULES = ("qkv", "o", "down")


class PackedLinear:
    """vLLM's ``MergedColumnParallelLinearWithLoRA`` on two slices (4 slots, max rank 4,
    8 in, 6 and 2 out): ``set_lora`` zeroes the slot, then copies each adapted slice."""

    tp_size = 1

    def __init__(self) -> None:
        self.lora_a_stacked = (torch.zeros(4, 1, 4, 8), torch.zeros(4, 1, 4, 8))
        self.lora_b_stacked = (torch.zeros(4, 1, 6, 4), torch.zeros(4, 1, 2, 4))
        self.zeroed: list[int] = []

    def reset_lora(self, index: int) -> None:
        self.zeroed.append(index)
        for stacked in (*self.lora_a_stacked, *self.lora_b_stacked):
            stacked[index] = 0

    def set_lora(self, index: int, lora_a: list, lora_b: list) -> None:
        self.reset_lora(index)
        for i, (a, b) in enumerate(zip(lora_a, lora_b, strict=True)):
            if a is not None:
                self.lora_a_stacked[i][index, 0, : a.shape[0], : a.shape[1]].copy_(a)
            if b is not None:
                self.lora_b_stacked[i][index, 0, : b.shape[0], : b.shape[1]].copy_(b)


def packed_weights(gen: torch.Generator, ranks: tuple[int, int]) -> tuple[list, list]:
    """An adapter's A and B per slice of a ``PackedLinear`` (rank 0: not adapted)."""
    a = [torch.randn(r, 8, generator=gen) if r else None for r in ranks]
    b = [
        torch.randn(out, r, generator=gen) if r else None
        for out, r in zip((6, 2), ranks, strict=True)
    ]
    return a, b


class VllmLoop:
    """The state vLLM's ``LoRAModelManager.activate_adapter`` reads, with that method."""

    _get_lora_layer_weights = LoRAModelManager._get_lora_layer_weights

    def __init__(self, slots: int) -> None:
        self.is_pooling_model = False
        self._active_adapters: dict[int, None] = {}
        self._registered_adapters: dict[int, LoRAModel] = {}
        self.lora_index_to_id: list[int | None] = [None] * slots
        self.listener = Listener()
        self.punica_wrapper_mapping = {"language_model": self.listener}
        self.modules = {name: PackedLinear() for name in MODULES}
        for layer in self.modules.values():
            layer.punica_wrapper = self.listener
        self.loops = 0
        """Activations done by vLLM's loop (not counting adapters already active)."""

    def activate_adapter(self, lora_id: int) -> bool:
        activated = inspect.unwrap(LoRAModelManager.activate_adapter)(self, lora_id)
        self.loops += activated
        return activated

    def evict(self, lora_id: int) -> None:
        """vLLM's ``deactivate_adapter``: the slot is freed, its weights stay."""
        self.lora_index_to_id[self.lora_index_to_id.index(lora_id)] = None
        del self._active_adapters[lora_id]

    def tensors(self) -> list[torch.Tensor]:
        return [t for m in self.modules.values() for t in (*m.lora_a_stacked, *m.lora_b_stacked)]


class Watched(VllmLoop):
    pass


watch_activations(Watched)


def adapter(lora_id: int, gen: torch.Generator, ranks: dict[str, tuple[int, int]]) -> LoRAModel:
    """A ``LoRAModel`` adapting each module of ``ranks`` with those slice ranks (0: none)."""
    loras = {}
    for name, slice_ranks in ranks.items():
        a, b = packed_weights(gen, slice_ranks)
        loras[name] = LoRALayerWeights(name, max(slice_ranks), 1, a, b, scaling=1.0)
    return LoRAModel(lora_id, 4, loras)


def register(managers: list[VllmLoop], model: LoRAModel) -> None:
    for manager in managers:
        manager._registered_adapters[model.id] = model


def activate(managers: list[VllmLoop], lora_id: int) -> None:
    """Activate in every manager (evicting the least recently activated when full) and check
    that the slots hold the same tensors."""
    for manager in managers:
        if lora_id not in manager._active_adapters and None not in manager.lora_index_to_id:
            manager.evict(next(iter(manager._active_adapters)))
        manager.activate_adapter(lora_id)
    reference, *others = managers
    for other in others:
        assert other.lora_index_to_id == reference.lora_index_to_id
        for got, want in zip(other.tensors(), reference.tensors(), strict=True):
            assert torch.equal(got, want)


def test_adapters_taking_turns_leave_the_slots_as_vllms_loop():
    """Adapters of other modules, slices and ranks take turns in 2 slots: after each
    activation every stacked tensor equals vLLM's, and only the first went through its loop."""
    gen, pick = torch.Generator().manual_seed(21), random.Random(21)
    managers = [VllmLoop(2), Watched(2)]
    for lora_id in range(1, 9):
        ranks = {
            name: (pick.choice((0, 2, 4)), pick.choice((0, 1, 4)))
            for name in pick.sample(MODULES, pick.randint(1, 3))
        }
        register(managers, adapter(lora_id, gen, ranks))
    for lora_id in [pick.randint(1, 8) for _ in range(40)]:
        activate(managers, lora_id)
    watched = managers[1]
    assert watched.loops == 1
    # the announcements name the written modules only, with the weights written
    slot, slots, layers = watched.listener.heard[-1]
    assert slots == 2 and layers
    for layer, weights, fresh in layers:
        assert not fresh
        name = next(n for n, m in watched.modules.items() if m is layer)
        model = watched._registered_adapters[watched.lora_index_to_id[slot]]
        assert weights is model.get_lora(name)


def test_a_write_behind_its_back_sends_the_next_activation_through_vllms_loop():
    gen = torch.Generator().manual_seed(22)
    managers = [VllmLoop(2), Watched(2)]
    register(managers, adapter(1, gen, {"qkv": (4, 4), "o": (2, 2)}))
    register(managers, adapter(2, gen, {"qkv": (2, 0)}))
    register(managers, adapter(3, gen, {"down": (1, 1)}))
    activate(managers, 1)
    activate(managers, 2)
    for manager in managers:
        manager.modules["down"].lora_a_stacked[0][0, 0, 1, 2] = 5.0  # slot 0, not seen
        manager.modules["down"].lora_b_stacked[0][0, 0, 3, 1] = 5.0
    activate(managers, 3)  # into slot 0, written since: vLLM's loop
    assert managers[1].loops == 2
    activate(managers, 1)  # into slot 1: not known since the write, the loop again
    activate(managers, 2)  # into slot 0: known from the loop that wrote it, one pass
    assert managers[1].loops == 3


def test_weights_not_covering_their_slices_go_through_vllms_loop():
    gen = torch.Generator().manual_seed(23)
    managers = [VllmLoop(2), Watched(2)]
    register(managers, adapter(1, gen, {"qkv": (4, 4)}))
    short = adapter(2, gen, {"o": (2, 2)})
    short.loras["o"].lora_b[0] = short.loras["o"].lora_b[0][:3]  # a shard of B's rows
    register(managers, short)
    register(managers, adapter(3, gen, {"o": (4, 4)}))
    for lora_id in (1, 2, 3, 1, 2):
        activate(managers, lora_id)
    assert managers[1].loops == 3  # the first and both of the shard's


def test_adapters_of_the_same_modules_taking_turns_zero_nothing_after_the_first():
    """vLLM zeroes every module's slot at each activation (``set_lora`` resets first); one
    pass overwrites qkv and leaves o and down, zero already, alone."""
    gen = torch.Generator().manual_seed(24)
    managers = [VllmLoop(1), Watched(1)]
    register(managers, adapter(1, gen, {"qkv": (4, 4)}))
    register(managers, adapter(2, gen, {"qkv": (2, 4)}))
    for lora_id in (1, 2, 1, 2):
        activate(managers, lora_id)
    reference, watched = managers
    assert [len(m.zeroed) for m in reference.modules.values()] == [4, 4, 4]
    assert [len(m.zeroed) for m in watched.modules.values()] == [1, 1, 1]  # the first: vLLM's
