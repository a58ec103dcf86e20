"""Prepacked LoRA blocks: repacked only when their own slot's values change."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from onednn_stand_in import onednn_ops

from loraplex.fastlora.slot_writes import SlotWrites
from loraplex.fastlora.weights import PACKED_DTYPES, LoraWeights

PACKED = torch.bfloat16
"""The dtype of these tests' weights: one that is prepacked."""
assert PACKED in PACKED_DTYPES


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to bf16 rounding (oneDNN and torch.matmul round differently)."""
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)


class CountingOneDnn:
    """vLLM's oneDNN ops (or their stand-in), counting the packs."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.packs = 0

    def create_onednn_mm(self, weight: torch.Tensor, batch: int) -> Any:
        self.packs += 1
        return self.inner.create_onednn_mm(weight, batch)

    def onednn_mm(self, handler: Any, x: torch.Tensor, bias: Any) -> torch.Tensor:
        return self.inner.onednn_mm(handler, x, bias)


@pytest.fixture
def weights(monkeypatch) -> tuple[LoraWeights, CountingOneDnn]:
    cache = LoraWeights()
    counting = CountingOneDnn(onednn_ops(cache._onednn))
    monkeypatch.setattr(cache, "_onednn", counting)
    return cache, counting


def stacked_a(slots: int = 4, rank: int = 4, d_in: int = 8) -> torch.Tensor:
    return torch.zeros(slots, 1, rank, d_in, dtype=PACKED)


def test_writing_one_slot_repacks_that_slot_only(weights):
    cache, onednn = weights
    gen = torch.Generator().manual_seed(3)
    a = stacked_a()
    a[1, 0].copy_(torch.randn(4, 8, generator=gen))
    a[2, 0].copy_(torch.randn(4, 8, generator=gen))
    x = torch.randn(3, 8, generator=gen, dtype=PACKED)
    for slot in (1, 2):
        close(cache.matmul(x, a, False, slot, 1, 4), x @ a[slot, 0].t())
    assert onednn.packs == 2
    slot1 = cache.packed(a, False, 1, 1, 4)

    a[2, 0].copy_(torch.randn(4, 8, generator=gen))  # vLLM loads another adapter into slot 2
    close(cache.matmul(x, a, False, 1, 1, 4), x @ a[1, 0].t())
    close(cache.matmul(x, a, False, 2, 1, 4), x @ a[2, 0].t())
    assert onednn.packs == 3  # slot 2 again; slot 1 kept its packed matrix
    assert cache.packed(a, False, 1, 1, 4) is slot1

    a[1, 0].copy_(a[1, 0].clone())  # the same values written again: nothing to repack
    close(cache.matmul(x, a, False, 1, 1, 4), x @ a[1, 0].t())
    assert onednn.packs == 3


def test_blocks_of_slots_follow_any_slot_they_cover(weights):
    cache, onednn = weights
    gen = torch.Generator().manual_seed(4)
    b = torch.randn(4, 1, 6, 4, generator=gen, dtype=PACKED)
    h = torch.randn(5, 8, generator=gen, dtype=PACKED)
    expected = h @ cache.block(b, True, 1, 2, 6)
    close(cache.matmul(h, b, True, 1, 2, 6), expected)
    b[3, 0].copy_(torch.randn(6, 4, generator=gen))  # outside the block
    close(cache.matmul(h, b, True, 1, 2, 6), expected)
    assert onednn.packs == 1
    b[2, 0].copy_(torch.randn(6, 4, generator=gen))  # inside it
    close(cache.matmul(h, b, True, 1, 2, 6), h @ cache.block(b, True, 1, 2, 6))
    assert onednn.packs == 2


def test_zero_slots_are_never_packed(weights):
    """A module the adapter does not target has zero LoRA weights: its product is zero."""
    cache, onednn = weights
    gen = torch.Generator().manual_seed(5)
    a = stacked_a()
    x = torch.randn(3, 8, generator=gen, dtype=PACKED)
    out = cache.matmul(x, a, False, 0, 1, 4)
    assert out.shape == (3, 4) and out.dtype == x.dtype and not out.any()
    assert onednn.packs == 0
    a[0, 0].copy_(torch.randn(4, 8, generator=gen))
    close(cache.matmul(x, a, False, 0, 1, 4), x @ a[0, 0].t())
    assert onednn.packs == 1
    a[0, 0].zero_()  # unloaded: zero again
    assert not cache.matmul(x, a, False, 0, 1, 4).any()
    assert onednn.packs == 1


def test_packed_copy_is_private(weights):
    """The values kept for comparison never alias vLLM's tensor (it is written in place)."""
    cache, _ = weights
    b = torch.randn(2, 1, 6, 4)
    for is_b, stacked, span in ((True, b, 2), (False, torch.randn(2, 1, 1, 6), 1)):
        packed = cache.packed(stacked, is_b, 0, span, 6)
        before = packed.source.clone()
        stacked.add_(1.0)
        assert torch.equal(packed.source, before)


def test_float32_is_never_packed(weights):
    """In float32 MKL's sgemm is as fast at LoRA shapes, so a load packs nothing."""
    cache, onednn = weights
    gen = torch.Generator().manual_seed(6)
    a, b = torch.randn(3, 1, 4, 8, generator=gen), torch.randn(3, 1, 6, 4, generator=gen)
    x = torch.randn(5, 8, generator=gen)
    h = cache.matmul(x, a, False, 1, 1, 4)
    torch.testing.assert_close(h, x @ a[1, 0].t())
    torch.testing.assert_close(cache.matmul(h, b, True, 1, 1, 6), h @ b[1, 0].t())
    torch.testing.assert_close(
        cache.matmul(h.repeat(1, 2), b, True, 0, 2, 6),
        h.repeat(1, 2) @ cache.block(b, True, 0, 2, 6),
    )
    cache.refresh(a, b, 2, 6)
    assert onednn.packs == 0


@pytest.mark.parametrize("is_b", [True, False], ids=["B", "A cut to a rank"])
def test_a_block_of_several_slots_copies_again_only_the_slots_written(is_b, monkeypatch):
    """A packed group's block is a view of a copy of every slot. A load into one slot that
    ``slot_writes`` heard copies that slot only (into the same copy); a write it did not
    hear copies every slot. The block equals vLLM's slots after each."""
    writes = SlotWrites()
    cache = LoraWeights(use_onednn=False, writes=writes)
    gen = torch.Generator().manual_seed(7)
    shape = (4, 1, 6, 8) if is_b else (4, 1, 8, 6)  # B (slots, 1, out, rank), A (.., rank, in)
    stacked = torch.randn(shape, generator=gen)
    writes.written(0, 4)  # the engine's slots were loaded before, and heard
    rank = 5

    def expected() -> torch.Tensor:
        s3 = stacked[:, 0]
        if is_b:
            return s3[1:4, :, :rank].transpose(1, 2).reshape(3 * rank, 6)
        return s3[1:4, :rank].reshape(3 * rank, 6).t()

    copied = []
    real = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda t, *a: copied.append(1) or real(t, *a))
    assert torch.equal(cache.block(stacked, is_b, 1, 3, 6, rank), expected())
    for slot, heard in ((2, True), (0, True), (3, False), (1, True)):
        stacked[slot].copy_(torch.randn(stacked[slot].shape, generator=gen))
        if heard:
            writes.written(slot, 4)
        copied.clear()
        assert torch.equal(cache.block(stacked, is_b, 1, 3, 6, rank), expected()), slot
        assert len(copied) == (0 if heard else 1), slot
