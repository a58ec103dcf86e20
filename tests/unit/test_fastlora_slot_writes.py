"""After vLLM writes an adapter into one slot, the fast-LoRA caches look at that slot only."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from onednn_stand_in import onednn_ops

from loraplex.fastlora import weights as weights_module
from loraplex.fastlora.activation import watch_activations
from loraplex.fastlora.live import LiveSlots
from loraplex.fastlora.slot_writes import SlotWrites, adapted_slices
from loraplex.fastlora.weights import LoraWeights


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to bf16 rounding (oneDNN and torch.matmul round differently)."""
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)


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
    assert live.rows(stacked) == (2, 0, 0)

    stacked[1] = 1.0  # vLLM activates an adapter in slot 1 and says so
    stacked[2] = 1.0  # a write into slot 2 that was not announced
    writes.written(1, 3)
    assert live.rows(stacked) == (2, 2, 0)  # slot 2 was not looked at

    stacked[0] = 0  # another unannounced write: the counter moved, no write heard
    assert live.rows(stacked) == (0, 2, 2)  # so every slot is looked at


def test_weights_of_unwritten_slots_are_kept_without_a_copy(monkeypatch):
    writes = SlotWrites()
    cache = LoraWeights(writes=writes)
    monkeypatch.setattr(cache, "_onednn", onednn_ops(cache._onednn))
    gen = torch.Generator().manual_seed(6)
    a = torch.zeros(2, 1, 4, 8, dtype=torch.bfloat16)  # a prepacked dtype
    x = torch.randn(3, 8, generator=gen, dtype=torch.bfloat16)
    for slot in (0, 1):
        a[slot, 0].copy_(torch.randn(4, 8, generator=gen))
        writes.written(slot, 2)
        close(cache.matmul(x, a, False, slot, 1, 4), x @ a[slot, 0].t())
    copies = []
    real_copy = weights_module._block_copy
    monkeypatch.setattr(
        weights_module, "_block_copy", lambda *args: copies.append(args[2]) or real_copy(*args)
    )
    a[1, 0].copy_(torch.randn(4, 8, generator=gen))
    writes.written(1, 2)
    for slot in (0, 1):
        close(cache.matmul(x, a, False, slot, 1, 4), x @ a[slot, 0].t())
    assert copies == [1]  # slot 0's block was neither copied nor compared


class Layer:
    """A LoRA layer as the manager holds it: which wrapper it uses."""

    def __init__(self, wrapper: object) -> None:
        self.punica_wrapper = wrapper


class Manager:
    """The part of vLLM's LoRAModelManager that ``watch_activations`` reads."""

    def __init__(
        self, wrapper: object, layers: dict[str, object], adapted: set[str] = frozenset()
    ) -> None:
        self.lora_index_to_id: list[int | None] = [None, None]
        self.punica_wrapper_mapping = {"language_model": wrapper, "other": object()}
        self.modules = layers
        self.adapted = adapted
        self._registered_adapters: dict[int, str] = {}

    def activate_adapter(self, lora_id: int) -> bool:
        if lora_id in self.lora_index_to_id:
            return False
        self.lora_index_to_id[self.lora_index_to_id.index(None)] = lora_id
        return True

    def add(self, lora_id: int) -> bool:
        """``add_adapter``: register the adapter, then activate it."""
        self._registered_adapters[lora_id] = f"adapter {lora_id}"
        return self.activate_adapter(lora_id)

    def _get_lora_layer_weights(self, adapter: str, name: str) -> SimpleNamespace | None:
        """vLLM's per-layer weights of ``adapter``: one A tensor where it adapts ``name``."""
        return SimpleNamespace(lora_a=torch.ones(1)) if name in self.adapted else None


class Listener:
    def __init__(self) -> None:
        self.heard: list[tuple[int, int, list[tuple[object, object]]]] = []

    def slot_written(
        self, slot: int, slots: int, layers: list[tuple[object, object, bool]]
    ) -> None:
        self.heard.append((slot, slots, layers))


def test_activations_are_announced_to_the_wrappers_once():
    class Watched(Manager):
        pass

    watch_activations(Watched)
    watch_activations(Watched)  # idempotent: one announcement per write
    listener = Listener()
    mine, theirs = Layer(listener), Layer(object())
    manager = Watched(listener, {"q": mine, "tower": theirs})
    assert manager.add(5) and manager.add(8)
    assert not manager.activate_adapter(5)  # already in a slot: nothing written
    assert listener.heard == [(0, 2, [(mine, None, False)]), (1, 2, [(mine, None, False)])]


def test_the_fast_wrapper_watches_vllms_manager():
    pytest.importorskip("vllm")
    from vllm.lora.model_manager import LoRAModelManager

    import loraplex.fastlora.punica  # noqa: F401  (installs the watch)

    assert getattr(LoRAModelManager.activate_adapter, "_loraplex_watched", False)


class Linear(Layer):
    """A one-slice LoRA linear layer in vLLM's layout: 2 slots, rank 4, 8 in, 6 out."""

    output_slices = (6,)

    def __init__(self, wrapper: object) -> None:
        super().__init__(wrapper)
        self.lora_a_stacked = (torch.zeros(2, 1, 4, 8, dtype=torch.bfloat16),)
        self.lora_b_stacked = (torch.zeros(2, 1, 6, 4, dtype=torch.bfloat16),)


class Writer(Manager):
    """Activation writes the slot of every layer as vLLM does: the adapter's weights where it
    has them (``set_lora``), zeros elsewhere (``reset_lora``)."""

    def __init__(self, wrapper: object, layers: dict[str, Linear], adapted: set[str]) -> None:
        super().__init__(wrapper, layers, adapted)
        self.gen = torch.Generator().manual_seed(7)

    def activate_adapter(self, lora_id: int) -> bool:
        activated = super().activate_adapter(lora_id)
        slot = self.lora_index_to_id.index(lora_id)
        for name, layer in self.modules.items():
            for stacked in (*layer.lora_a_stacked, *layer.lora_b_stacked):
                stacked[slot] = 0
                if name in self.adapted:
                    stacked[slot].copy_(torch.randn(stacked[slot].shape, generator=self.gen))
        return activated


def test_an_activation_readies_the_slot_so_its_first_step_repacks_nothing(monkeypatch):
    """The fast wrapper packs the written slot inside the activation (``add_lora``), so a
    preloaded version's first step finds every cache current and computes the same delta."""
    pytest.importorskip("vllm")
    from vllm.lora.layers import LoRAMapping

    from loraplex.fastlora.punica import FastPunicaWrapperCPU

    class Watched(Writer):
        pass

    watch_activations(Watched)
    wrapper = FastPunicaWrapperCPU(16, 4, "cpu")
    packs = []
    onednn = onednn_ops(wrapper._weights._onednn)
    counting = SimpleNamespace(
        create_onednn_mm=lambda w, batch: (
            packs.append(w.shape) or onednn.create_onednn_mm(w, batch)
        ),
        onednn_mm=onednn.onednn_mm,
    )
    monkeypatch.setattr(wrapper._weights, "_onednn", counting)
    q, k = Linear(wrapper), Linear(wrapper)
    manager = Watched(wrapper, {"q": q, "k": k}, adapted={"q"})

    assert manager.add(5)
    assert packs == [(8, 4), (4, 6)]  # q's A and B of slot 0, at once; k's zero slot: none

    looked = []
    changed = wrapper._writes.changed
    monkeypatch.setattr(wrapper._writes, "changed", lambda *a: looked.append(a) or changed(*a))
    wrapper.update_metadata(LoRAMapping((5,) * 3, (5,), is_prefill=True), [5, None], 2, 32)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(8), dtype=torch.bfloat16)
    for layer in (q, k):
        y = torch.zeros(3, 6, dtype=torch.bfloat16)
        wrapper.run_linear(y, x, layer.lora_a_stacked, layer.lora_b_stacked, 1.0, (6,))
        a, b = layer.lora_a_stacked[0][0, 0], layer.lora_b_stacked[0][0, 0]
        close(y, x @ a.t() @ b.t())
    assert packs == [(8, 4), (4, 6)]  # the step packed nothing
    assert looked == []  # and found every zero flag and pack current


def test_the_first_activation_says_which_layers_were_zero_as_created():
    class Watched(Writer):
        pass

    watch_activations(Watched)
    listener = Listener()
    q, k, used = Linear(listener), Linear(listener), Linear(listener)
    used.lora_b_stacked[0][1, 0, 0, 0] = 3.0  # written before: not fresh
    manager = Watched(listener, {"q": q, "k": k, "used": used}, adapted={"q"})
    assert manager.add(5) and manager.add(8)
    first, second = ([fresh for _, _, fresh in layers] for _, _, layers in listener.heard)
    assert first == [True, True, False]
    assert second == [False, False, False]  # the wrappers have looked at every layer by now


def test_the_first_load_into_fresh_layers_looks_at_no_weights(monkeypatch):
    """vLLM's stacked tensors start at zero: after the first activation the written slot's
    flags come from what was written, the others are zero, and nothing is reduced (~40 ms
    over the bundled model's ~420 stacked tensors)."""
    pytest.importorskip("vllm")
    from vllm.lora.layers import LoRAMapping

    from loraplex.fastlora import live as live_module
    from loraplex.fastlora.punica import FastPunicaWrapperCPU

    class Watched(Writer):
        pass

    watch_activations(Watched)
    wrapper = FastPunicaWrapperCPU(16, 4, "cpu")
    q, k = Linear(wrapper), Linear(wrapper)
    manager = Watched(wrapper, {"q": q, "k": k}, adapted={"q"})
    reductions = []
    rows_used = live_module._rows_used
    monkeypatch.setattr(
        live_module, "_rows_used", lambda t: reductions.append(t.shape) or rows_used(t)
    )
    assert manager.add(5)
    assert reductions == []

    wrapper.update_metadata(LoRAMapping((5,) * 3, (5,), is_prefill=True), [5, None], 2, 32)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(8), dtype=torch.bfloat16)
    for layer, adapted in ((q, True), (k, False)):
        y = torch.zeros(3, 6, dtype=torch.bfloat16)
        wrapper.run_linear(y, x, layer.lora_a_stacked, layer.lora_b_stacked, 1.0, (6,))
        a, b = layer.lora_a_stacked[0][0, 0], layer.lora_b_stacked[0][0, 0]
        close(y, x @ a.t() @ b.t())
        assert bool(y.any()) == adapted
    assert reductions == []


def test_a_fresh_tensors_first_look_takes_the_written_slot_and_zeros_elsewhere():
    live = LiveSlots(SlotWrites())
    a, b = torch.zeros(3, 1, 4, 8), torch.zeros(3, 1, 6, 4)
    a[1, 0, :2], b[1, 0, :, :2] = 1.0, 1.0
    assert live.written(1, a, b, 2, fresh=True)
    assert live.rows(a) == (0, 2, 0) and live.rows(b) == (0, 6, 0)
    assert live.live((0, 1, 2), a, b) == (1,)


def test_adapted_slices_say_which_slices_an_activation_wrote_and_their_rank():
    a = torch.ones(2, 8)  # rank 2
    assert adapted_slices(None, 3) == (0, 0, 0)  # reset_lora: zeros
    assert adapted_slices(SimpleNamespace(lora_a=a), 2) == (2, 2)  # split by vLLM
    packed = SimpleNamespace(lora_a=[a, None, torch.ones(4, 8)])  # q and v of a q/k/v layer
    assert adapted_slices(packed, 3) == (2, 0, 4)
    assert adapted_slices(packed, 4) == (None,) * 4  # regrouped by vLLM: look


def test_a_written_slot_takes_its_flags_from_what_was_written_without_a_look():
    writes = SlotWrites()
    live = LiveSlots(writes)
    a, b = torch.zeros(3, 1, 2, 4), torch.zeros(3, 1, 6, 2)
    assert live.rows(a) == live.rows(b) == (0,) * 3
    a[1], b[1] = 1.0, 1.0
    writes.written(1, 3)
    assert live.written(1, a, b, None)  # not known: looked at
    a[1], b[1] = 0.0, 0.0
    writes.written(1, 3)
    # Weights written, though zero here: live without a look (the ops then add an exact 0).
    assert live.written(1, a, b, 2)
    assert live.live((0, 1, 2), a, b) == (1,)
    a[2], b[2] = 1.0, 1.0
    writes.written(2, 3)
    assert not live.written(2, a, b, 0)  # told zero: the values are not looked at
    assert live.live((0, 1, 2), a, b) == (1,)
