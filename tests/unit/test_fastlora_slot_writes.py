"""After vLLM writes an adapter into one slot, the fast-LoRA caches look at that slot only."""

from __future__ import annotations

import pytest
import torch

from loraplex.fastlora import weights as weights_module
from loraplex.fastlora.live import LiveSlots
from loraplex.fastlora.slot_writes import SlotWrites, watch_activations
from loraplex.fastlora.weights import LoraWeights


def test_changed_names_the_slots_written_since_a_stamp():
    writes = SlotWrites()
    assert writes.changed(writes.stamp, 3) is None  # nothing heard: unknown
    writes.written(1, 3)
    before = writes.stamp
    writes.written(2, 3)
    writes.written(2, 3)
    assert writes.changed(before, 3) == (2,)
    assert writes.changed(writes.stamp, 3) is None
    assert writes.changed(before, 4) is None  # a tensor with other slots: unknown


def test_live_rescans_the_written_slot_only_and_everything_when_it_heard_nothing():
    writes = SlotWrites()
    live = LiveSlots(writes)
    stacked = torch.zeros(3, 1, 2, 4)
    stacked[0] = 1.0
    writes.written(0, 3)
    assert live.flags(stacked) == (True, False, False)

    stacked[1] = 1.0  # vLLM activates an adapter in slot 1 and says so
    stacked[2] = 1.0  # a write into slot 2 that was not announced
    writes.written(1, 3)
    assert live.flags(stacked) == (True, True, False)  # slot 2 was not looked at

    stacked[0] = 0  # another unannounced write: the counter moved, no write heard
    assert live.flags(stacked) == (False, True, True)  # so every slot is looked at


def test_weights_of_unwritten_slots_are_kept_without_a_copy(monkeypatch):
    writes = SlotWrites()
    cache = LoraWeights(writes=writes)
    if not cache.uses_onednn:
        pytest.skip("vLLM's oneDNN GEMM is not available here")
    gen = torch.Generator().manual_seed(6)
    a = torch.zeros(2, 1, 4, 8)
    x = torch.randn(3, 8, generator=gen)
    for slot in (0, 1):
        a[slot, 0].copy_(torch.randn(4, 8, generator=gen))
        writes.written(slot, 2)
        torch.testing.assert_close(cache.matmul(x, a, False, slot, 1, 4), x @ a[slot, 0].t())
    copies = []
    real_copy = weights_module._block_copy
    monkeypatch.setattr(
        weights_module, "_block_copy", lambda *args: copies.append(args[2]) or real_copy(*args)
    )
    a[1, 0].copy_(torch.randn(4, 8, generator=gen))
    writes.written(1, 2)
    for slot in (0, 1):
        torch.testing.assert_close(cache.matmul(x, a, False, slot, 1, 4), x @ a[slot, 0].t())
    assert copies == [1]  # slot 0's block was neither copied nor compared


class Manager:
    """The part of vLLM's LoRAModelManager that ``watch_activations`` reads."""

    def __init__(self, wrapper: object) -> None:
        self.lora_index_to_id: list[int | None] = [None, None]
        self.punica_wrapper_mapping = {"language_model": wrapper, "other": object()}

    def activate_adapter(self, lora_id: int) -> bool:
        if lora_id in self.lora_index_to_id:
            return False
        self.lora_index_to_id[self.lora_index_to_id.index(None)] = lora_id
        return True


class Listener:
    def __init__(self) -> None:
        self.heard: list[tuple[int, int]] = []

    def slot_written(self, slot: int, slots: int) -> None:
        self.heard.append((slot, slots))


def test_activations_are_announced_to_the_wrappers_once():
    class Watched(Manager):
        pass

    watch_activations(Watched)
    watch_activations(Watched)  # idempotent: one announcement per write
    listener = Listener()
    manager = Watched(listener)
    assert manager.activate_adapter(5) and manager.activate_adapter(8)
    assert not manager.activate_adapter(5)  # already in a slot: nothing written
    assert listener.heard == [(0, 2), (1, 2)]


def test_the_fast_wrapper_watches_vllms_manager():
    pytest.importorskip("vllm")
    from vllm.lora.model_manager import LoRAModelManager

    import loraplex.fastlora.punica  # noqa: F401  (installs the watch)

    assert getattr(LoRAModelManager.activate_adapter, "_loraplex_watched", False)
