"""After vLLM writes an adapter into one slot, the fast-LoRA caches look at that slot only."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from onednn_stand_in import onednn_ops

from loraplex.fastlora import weights as weights_module
from loraplex.fastlora.activation import watch_activations
from loraplex.fastlora.live import LiveSlots
from loraplex.fastlora.slot_writes import (
    SlotWrites,
    adapted_slices,
    skip_resets_of_zero_slots,
    write_over_known_slots,
)
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


class Resettable:
    """vLLM's ``BaseLinearLayerWithLoRA.reset_lora`` on two slices, counting the slots zeroed.
    Its slots hold an earlier adapter's weights (``used``) or are zero as created."""

    def __init__(self, used: bool = True) -> None:
        self.lora_a_stacked = (torch.zeros(3, 1, 4, 8), torch.zeros(3, 1, 4, 8))
        self.lora_b_stacked = (torch.zeros(3, 1, 6, 4), torch.zeros(3, 1, 6, 4))
        for stacked in (*self.lora_a_stacked, *self.lora_b_stacked) if used else ():
            stacked.fill_(1.0)
        self.zeroed: list[int] = []

    def reset_lora(self, index: int) -> None:
        self.zeroed.append(index)
        for stacked in (*self.lora_a_stacked, *self.lora_b_stacked):
            stacked[index] = 0

    def set_lora(self, index: int) -> None:
        self.reset_lora(index)
        self.lora_a_stacked[1][index, 0, :2].copy_(torch.ones(2, 8))
        self.lora_b_stacked[1][index, 0, :, :2].copy_(torch.ones(6, 2))


def test_a_slot_still_zero_from_its_last_reset_is_not_zeroed_again():
    class Layer(Resettable):
        pass

    skip_resets_of_zero_slots(Layer)
    skip_resets_of_zero_slots(Layer)  # idempotent
    layer = Layer()
    layer.reset_lora(0)
    layer.reset_lora(1)
    layer.reset_lora(0)
    layer.reset_lora(1)
    assert layer.zeroed == [0, 1]

    layer.set_lora(2)  # writes slot 2: the tensors moved, so no slot is taken as zero on trust
    layer.reset_lora(0)
    assert layer.zeroed == [0, 1, 2, 0]
    layer.reset_lora(2)  # the adapter's weights are zeroed
    assert layer.zeroed[-1] == 2
    assert not any(t[2].any() for t in (*layer.lora_a_stacked, *layer.lora_b_stacked))

    layer.lora_b_stacked[0][1, 0, 0, 0] = 5.0  # a write this module did not see
    layer.reset_lora(1)
    assert layer.zeroed[-1] == 1 and not layer.lora_b_stacked[0][1].any()


def test_a_reset_after_set_lora_into_a_zero_slot_keeps_the_new_weights():
    """set_lora's own reset of a zero slot is skipped; the weights it then writes stay."""

    class Layer(Resettable):
        pass

    skip_resets_of_zero_slots(Layer)
    layer = Layer()
    layer.reset_lora(0)
    layer.set_lora(0)
    assert layer.zeroed == [0]
    assert layer.lora_a_stacked[1][0].sum() == 16


def test_vllms_linear_embedding_and_logits_lora_layers_skip_resets_of_zero_slots():
    pytest.importorskip("vllm")
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA
    from vllm.lora.layers.vocab_parallel_embedding import VocabParallelEmbeddingWithLoRA

    import loraplex.fastlora.punica  # noqa: F401  (installs the wrapper)

    layers = (BaseLinearLayerWithLoRA, VocabParallelEmbeddingWithLoRA, LogitsProcessorWithLoRA)
    for layer_cls in layers:
        assert getattr(layer_cls.reset_lora, "_loraplex_skips_zero", False)
    from vllm.lora.layers.column_parallel_linear import (
        MergedQKVParallelLinearWithLoRA,
        QKVParallelLinearWithLoRA,
    )
    from vllm.lora.layers.row_parallel_linear import RowParallelLinearWithLoRA

    for layer_cls in (MergedQKVParallelLinearWithLoRA, QKVParallelLinearWithLoRA):
        assert getattr(layer_cls.set_lora, "_loraplex_tracks", False)
    assert getattr(RowParallelLinearWithLoRA.set_lora, "_loraplex_tracks", False)


def test_slots_zero_as_created_are_not_zeroed_until_written():
    """vLLM creates the stacked tensors with zeros: the first adapter loaded into each slot
    skips the resets of the modules it does not adapt."""

    class Layer(Resettable):
        pass

    skip_resets_of_zero_slots(Layer)
    layer = Layer(used=False)
    for slot in (2, 0, 1, 0):
        layer.reset_lora(slot)
    assert layer.zeroed == []

    layer.set_lora(1)  # its own reset of the zero slot is skipped too
    assert layer.zeroed == []
    layer.reset_lora(0)  # written since: zeroed, and known zero again from then on
    layer.reset_lora(1)
    layer.reset_lora(0)
    assert layer.zeroed == [0, 1]
    assert not any(t.any() for t in (*layer.lora_a_stacked, *layer.lora_b_stacked))


def test_the_embeddings_one_tensor_per_side_is_skipped_alike():
    """vLLM's embedding LoRA holds A and B as one tensor each, not a tuple of slices."""

    class Embedding:
        def __init__(self) -> None:
            self.lora_a_stacked = torch.zeros(3, 10, 4)
            self.lora_b_stacked = torch.zeros(3, 1, 6, 4)
            self.zeroed: list[int] = []

        def reset_lora(self, index: int) -> None:
            self.zeroed.append(index)
            self.lora_a_stacked[index] = 0
            self.lora_b_stacked[index] = 0

    skip_resets_of_zero_slots(Embedding)
    embedding = Embedding()
    embedding.reset_lora(1)
    assert embedding.zeroed == []  # zero as created
    embedding.lora_a_stacked[2, 0, 0] = 1.0  # written: no slot is taken as zero on trust
    embedding.reset_lora(1)
    embedding.reset_lora(2)
    embedding.reset_lora(1)
    assert embedding.zeroed == [1, 2] and not embedding.lora_a_stacked.any()


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


def wrapped_packed_linear() -> PackedLinear:
    """A ``PackedLinear`` of a class of its own with the reset and set_lora wrappers."""

    class Wrapped(PackedLinear):
        pass

    skip_resets_of_zero_slots(Wrapped)
    write_over_known_slots(Wrapped)
    return Wrapped()


def test_a_known_slot_is_overwritten_without_a_reset_to_the_same_tensors():
    """Adapters of other ranks and slices take turns in the slots: the wrapped set_lora zeroes
    only what the new weights leave of the old, and the slots end up as vLLM's would."""

    class Wrapped(PackedLinear):
        pass

    skip_resets_of_zero_slots(Wrapped)
    write_over_known_slots(Wrapped)
    write_over_known_slots(Wrapped)  # idempotent
    wrapped, reference = Wrapped(), PackedLinear()
    gen = torch.Generator().manual_seed(11)
    turns = [(0, (4, 4)), (0, (2, 4)), (1, (4, 0)), (0, (0, 3)), (1, (4, 0)), (0, (4, 4))]
    for slot, ranks in turns + [(2, (1, 1)), (1, (0, 0))]:
        a, b = packed_weights(gen, ranks)
        wrapped.set_lora(slot, a, b)
        reference.set_lora(slot, a, b)
        for got, want in zip(
            (*wrapped.lora_a_stacked, *wrapped.lora_b_stacked),
            (*reference.lora_a_stacked, *reference.lora_b_stacked),
            strict=True,
        ):
            assert torch.equal(got, want)
    assert wrapped.zeroed == []  # every slot was zero as created, then known
    wrapped.reset_lora(0)
    assert wrapped.zeroed == [0] and not any(t[0].any() for t in wrapped.lora_a_stacked)


def test_a_slot_written_behind_the_wrappers_back_is_reset_in_full():
    layer = wrapped_packed_linear()
    gen = torch.Generator().manual_seed(12)
    layer.set_lora(0, *packed_weights(gen, (4, 4)))
    layer.lora_a_stacked[1][0, 0, 3, 0] = 9.0  # a write the wrappers did not see
    a, b = packed_weights(gen, (2, 2))
    layer.set_lora(0, a, b)
    assert layer.zeroed == [0]  # vLLM's set_lora, with its reset
    assert not layer.lora_a_stacked[1][0, 0, 2:].any()
    assert torch.equal(layer.lora_a_stacked[1][0, 0, :2], a[1])


def test_weights_not_covering_their_slice_go_through_vllms_set_lora():
    layer = wrapped_packed_linear()
    gen = torch.Generator().manual_seed(13)
    layer.set_lora(0, *packed_weights(gen, (4, 4)))
    a, b = packed_weights(gen, (2, 2))
    layer.set_lora(0, a, [b[0][:3], b[1]])  # B shorter than the slice (a shard)
    assert layer.zeroed == [0]
    assert not layer.lora_b_stacked[0][0, 0, 3:].any()
    # what it wrote is known again: the next reset of another zero slot is skipped
    layer.reset_lora(1)
    assert layer.zeroed == [0]


def test_an_activation_names_only_the_tracked_layers_it_wrote():
    """A q/v adapter leaves o/gate/up/down zero: those layers are not announced (their caches
    are current), except at the manager's first activation; untracked layers always are."""

    class Tracked(PackedLinear):
        def __init__(self, wrapper: object) -> None:
            super().__init__()
            self.punica_wrapper = wrapper

    skip_resets_of_zero_slots(Tracked)
    write_over_known_slots(Tracked)
    gen = torch.Generator().manual_seed(14)

    class Activating(Manager):
        def activate_adapter(self, lora_id: int) -> bool:
            activated = super().activate_adapter(lora_id)
            slot = self.lora_index_to_id.index(lora_id)
            for name, layer in self.modules.items():
                if isinstance(layer, Tracked):
                    if name in self.adapted:
                        layer.set_lora(slot, *packed_weights(gen, (4, 4)))
                    else:
                        layer.reset_lora(slot)
            return activated

    watch_activations(Activating)
    listener = Listener()
    qkv, down, other = Tracked(listener), Tracked(listener), Layer(listener)
    manager = Activating(listener, {"qkv": qkv, "down": down, "other": other}, {"qkv"})
    manager.lora_index_to_id = [None] * 4
    for lora_id in (1, 2):
        assert manager.add(lora_id)
    first, second = ([layer for layer, _, _ in layers] for _, _, layers in listener.heard)
    assert first == [qkv, down, other]
    assert second == [qkv, other]
