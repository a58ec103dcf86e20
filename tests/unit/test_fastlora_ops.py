"""Fast CPU LoRA ops against a per-token einsum reference (random shapes, ranks, slices)."""

from __future__ import annotations

import pytest
import torch
from onednn_stand_in import onednn_ops

from loraplex.fastlora import ops
from loraplex.fastlora.plan import LoraPlan
from loraplex.fastlora.weights import LoraWeights

SLICES = {"single": (48,), "qkv": (64, 16, 16), "gate_up": (96, 96)}


def reference(y, x, a_list, b_list, indices, scale, slices):
    """vLLM's torch-op semantics (einsum on gathered weights), with slot -1 left untouched."""
    out = y.clone()
    used = indices >= 0
    offset = 0
    for a, b, size in zip(a_list, b_list, slices, strict=True):
        sel = indices[used]
        h = torch.einsum("bi,boi->bo", x[used], a[sel, 0]) * scale
        delta = torch.einsum("bi,boi->bo", h, b[sel, 0, :size])
        out[used, offset : offset + size] += delta
        offset += size
    return out


def weights(slots, rank, d_in, slices, gen, adapter_rank=None):
    adapter_rank = adapter_rank or rank
    a_list, b_list = [], []
    for size in slices:
        a = torch.zeros(slots, 1, rank, d_in)
        b = torch.zeros(slots, 1, size, rank)
        a[:, :, :adapter_rank] = torch.randn(slots, 1, adapter_rank, d_in, generator=gen)
        b[..., :adapter_rank] = torch.randn(slots, 1, size, adapter_rank, generator=gen)
        a_list.append(a)
        b_list.append(b)
    return a_list, b_list


def patterns(slots, gen):
    """Token-to-slot mappings: prefill runs, decode, mixed, all base, one adapter."""
    long_runs = torch.cat([torch.full((n,), s) for n, s in [(40, 0), (3, -1), (25, slots - 1)]])
    decode = torch.randint(-1, slots, (9,), generator=gen)
    mixed = torch.cat(
        [
            torch.full((30,), 1 % slots),
            torch.tensor([0, -1, slots - 1, 0]),
            torch.full((20,), -1),
            torch.full((17,), 0),
            torch.tensor([slots - 1, -1]),
        ]
    )
    return {
        "prefill": long_runs,
        "decode": decode,
        "mixed": mixed,
        "base": torch.full((12,), -1),
        "one": torch.full((7,), slots - 1),
        "random": torch.randint(-1, slots, (70,), generator=gen),
    }


@pytest.fixture(params=[False, True], ids=["torch", "onednn"])
def use_onednn(request) -> bool:
    """Both matmul back ends: torch.matmul, and vLLM's prepacked oneDNN GEMM (when present)."""
    if request.param and not LoraWeights().uses_onednn:
        pytest.skip("vLLM's oneDNN GEMM cannot pack bf16 on this CPU (needs AVX-512)")
    return request.param


@pytest.mark.parametrize("rank", [8, 16, 64])
@pytest.mark.parametrize("layout", sorted(SLICES))
def test_lora_linear_matches_reference(rank, layout, use_onednn):
    gen = torch.Generator().manual_seed(rank)
    slots, d_in, slices = 4, 32, SLICES[layout]
    a_list, b_list = weights(slots, rank, d_in, slices, gen)
    for name, indices in patterns(slots, gen).items():
        x = torch.randn(indices.numel(), d_in, generator=gen)
        y = torch.randn(indices.numel(), sum(slices), generator=gen)
        expected = reference(y, x, a_list, b_list, indices, 0.5, slices)
        plan = LoraPlan.build(indices)
        cache = LoraWeights(use_onednn)
        offset = 0
        for a, b, size in zip(a_list, b_list, slices, strict=True):
            ops.lora_linear(plan, y, x, a, b, 0.5, offset, size, cache)
            offset += size
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4, msg=name)


@pytest.mark.parametrize("rank", [8, 16, 64])
@pytest.mark.parametrize("layout", sorted(SLICES))
def test_shrink_then_expand_matches_reference(rank, layout):
    gen = torch.Generator().manual_seed(100 + rank)
    slots, d_in, slices = 3, 24, SLICES[layout]
    a_list, b_list = weights(slots, rank, d_in, slices, gen)
    for name, indices in patterns(slots, gen).items():
        x = torch.randn(indices.numel(), d_in, generator=gen)
        y = torch.randn(indices.numel(), sum(slices), generator=gen)
        expected = reference(y, x, a_list, b_list, indices, 2.0, slices)
        plan = LoraPlan.build(indices)
        offset = 0
        for a, b, size in zip(a_list, b_list, slices, strict=True):
            buffer = torch.full((indices.numel(), rank), float("nan"))
            ops.shrink(plan, buffer, x, a, 2.0)
            assert not buffer.isnan().any(), name
            ops.expand(plan, y, buffer, b, offset, size, add_inputs=True)
            offset += size
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4, msg=name)


def test_expand_without_add_inputs_overwrites_and_zeroes_base_rows():
    gen = torch.Generator().manual_seed(7)
    b = torch.randn(2, 1, 10, 8, generator=gen)
    h = torch.randn(5, 8, generator=gen)
    indices = torch.tensor([0, -1, 1, 1, -1])
    y = torch.randn(5, 10, generator=gen)
    ops.expand(LoraPlan.build(indices), y, h, b, 0, 10, add_inputs=False)
    for row, slot in enumerate(indices.tolist()):
        want = torch.zeros(10) if slot < 0 else h[row] @ b[slot, 0].t()
        torch.testing.assert_close(y[row], want)


def test_padding_lower_adapter_rank_and_wider_b_than_output(use_onednn):
    """Adapters of rank 8 in rank-16 slots; B wider than y (vocab padding) is cut to y."""
    gen = torch.Generator().manual_seed(3)
    a_list, b_list = weights(4, 16, 20, (40,), gen, adapter_rank=8)
    indices = torch.tensor([2, 2, -1, 0, 3, 3, 3, 1])
    x = torch.randn(8, 20, generator=gen)
    y = torch.randn(8, 33, generator=gen)
    expected = y.clone()
    expected += reference(torch.zeros(8, 40), x, a_list, b_list, indices, 1.0, (40,))[:, :33]
    ops.lora_linear(
        LoraPlan.build(indices), y, x, a_list[0], b_list[0], 1.0, 0, 40, LoraWeights(use_onednn)
    )
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)


def test_bfloat16_close_to_float32_reference(use_onednn):
    gen = torch.Generator().manual_seed(11)
    a_list, b_list = weights(4, 16, 64, (64, 16, 16), gen)
    a_list = [a * 0.1 for a in a_list]
    indices = torch.randint(-1, 4, (40,), generator=gen)
    x = torch.randn(40, 64, generator=gen)
    y = torch.zeros(40, 96)
    expected = reference(y, x, a_list, b_list, indices, 1.0, (64, 16, 16))
    y16 = y.to(torch.bfloat16)
    cache, offset = LoraWeights(use_onednn), 0
    plan = LoraPlan.build(indices)
    for a, b, size in zip(a_list, b_list, (64, 16, 16), strict=True):
        ops.lora_linear(
            plan, y16, x.bfloat16(), a.bfloat16(), b.bfloat16(), 1.0, offset, size, cache
        )
        offset += size
    torch.testing.assert_close(y16.float(), expected, rtol=0.05, atol=0.1)


def test_prepacked_bfloat16_applies_the_scale_once_on_every_path():
    """The prepacked path (vLLM's oneDNN ops, or their torch stand-in on a CPU that cannot
    pack bf16) for direct segments, a contiguous packed group and scattered packed rows."""
    gen = torch.Generator().manual_seed(12)
    slices = (48, 16)
    a_list, b_list = weights(4, 8, 32, slices, gen)
    a_list = [a * 0.1 for a in a_list]  # deltas of a few units: bf16 keeps ~0.02 of them
    cache = LoraWeights()
    cache._onednn = onednn_ops(cache._onednn)
    for name, indices in patterns(4, gen).items():
        x = torch.randn(indices.numel(), 32, generator=gen)
        y = torch.randn(indices.numel(), sum(slices), generator=gen)
        expected = reference(y, x, a_list, b_list, indices, 0.5, slices)
        y16, offset = y.bfloat16(), 0
        for a, b, size in zip(a_list, b_list, slices, strict=True):
            plan = LoraPlan.build(indices)
            ops.lora_linear(
                plan, y16, x.bfloat16(), a.bfloat16(), b.bfloat16(), 0.5, offset, size, cache
            )
            offset += size
        torch.testing.assert_close(y16.float(), expected, rtol=0.05, atol=0.1, msg=name)


def test_cached_layouts_follow_weight_updates(use_onednn):
    """vLLM writes a new adapter into a slot in place: cached copies must follow."""
    gen = torch.Generator().manual_seed(9)
    weights = LoraWeights(use_onednn)
    a = torch.zeros(3, 1, 4, 6)
    b = torch.zeros(3, 1, 5, 4)
    first = weights.block(b, True, 0, 3, 5)  # a block of several slots: a copy
    assert weights.block(b, True, 0, 3, 5).data_ptr() == first.data_ptr()
    x = torch.randn(2, 6, generator=gen)
    assert weights.matmul(x, a, False, 1, 1, 5).abs().sum() == 0
    a[1, 0].copy_(torch.randn(4, 6, generator=gen))
    b[1, 0, :, :2].copy_(torch.ones(5, 2))
    torch.testing.assert_close(weights.matmul(x, a, False, 1, 1, 5), x @ a[1, 0].t())
    second = weights.block(b, True, 0, 3, 5)
    assert second.data_ptr() != first.data_ptr()
    torch.testing.assert_close(second[4:8], b[1, 0].t())


def test_bfloat16_rows_have_the_same_bits_whichever_path_their_batch_takes():
    """A request's rows in bf16, alone (one direct segment), in a contiguous packed group and
    in a packed group scattered around a long run of another adapter: bitwise the same.
    Adding a rounded product with ``index_add_`` (two roundings) changed the scattered rows."""
    gen = torch.Generator().manual_seed(13)
    a_list, b_list = weights(4, 8, 64, (48,), gen)
    a, b = a_list[0].bfloat16() * 0.1, b_list[0].bfloat16()
    x_own = torch.randn(5, 64, generator=gen).bfloat16()
    x_other = torch.randn(20, 64, generator=gen).bfloat16()
    y_own = torch.randn(5, 48, generator=gen).bfloat16()
    y_other = torch.randn(20, 48, generator=gen).bfloat16()
    cache = LoraWeights(use_onednn=False)

    def own_rows(indices: list[int], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The first 5 rows (the request's) after the LoRA delta for ``indices``."""
        ops.lora_linear(LoraPlan.build(torch.tensor(indices)), y, x, a, b, 1.0, 0, 48, cache)
        return y[:5]

    alone = own_rows([2] * 5, x_own, y_own.clone())
    packed = own_rows(
        [2] * 5 + [3, 1], torch.cat([x_own, x_other[:2]]), torch.cat([y_own, y_other[:2]])
    )
    scattered_indices = [2] * 5 + [1] * 20 + [3] * 2
    scattered = own_rows(
        scattered_indices,
        torch.cat([x_own, x_other, x_other[:2]]),
        torch.cat([y_own, y_other, y_other[:2]]),
    )
    plans = [LoraPlan.build(torch.tensor(i)) for i in ([2] * 5 + [3, 1], scattered_indices)]
    assert plans[0].packed is not None and isinstance(plans[0].packed.rows, slice)
    assert plans[1].packed is not None and isinstance(plans[1].packed.rows, torch.Tensor)
    assert torch.equal(alone, packed)
    assert torch.equal(alone, scattered)


def test_rows_beyond_the_plan_get_no_delta():
    """A plan for 5 rows applied to 7: the prepared path (which does not slice rows that are
    the whole plan) must not add to the 2 rows the plan does not cover."""
    gen = torch.Generator().manual_seed(14)
    a_list, b_list = weights(2, 8, 16, (24,), gen)
    x = torch.randn(7, 16, generator=gen)
    y = torch.randn(7, 24, generator=gen)
    got = y.clone()
    plan = LoraPlan.build(torch.zeros(5, dtype=torch.long))
    ops.lora_linear(plan, got, x, a_list[0], b_list[0], 1.0, 0, 24, LoraWeights(False))
    torch.testing.assert_close(got[5:], y[5:], rtol=0, atol=0)
    want = reference(y[:5], x[:5], a_list, b_list, torch.zeros(5, dtype=torch.long), 1.0, (24,))
    torch.testing.assert_close(got[:5], want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("pattern", ["prefill", "decode", "mixed", "random"])
def test_prepared_slices_multiply_only_the_rank_the_adapters_use(pattern):
    """Adapters of rank 8 in rank-32 slots: a slice prepared for rank 8 multiplies blocks of
    8 rows per slot (a quarter of the bytes and FLOPs) and adds the same delta."""
    gen = torch.Generator().manual_seed(15)
    a_list, b_list = weights(4, 32, 20, (40,), gen, adapter_rank=8)
    indices = patterns(4, gen)[pattern]
    x = torch.randn(indices.numel(), 20, generator=gen)
    y = torch.randn(indices.numel(), 40, generator=gen)
    plan = LoraPlan.build(indices)
    cache = LoraWeights(use_onednn=False)
    views = ops.prepare(plan, 40, a_list[0], b_list[0], 0.5, 0, 40, cache, rank=8)
    assert views is not None
    prepared = views.bind(plan)
    assert prepared.accepts(y, x)
    for _, a, b in prepared.direct:
        assert a.shape == (20, 8) and b.shape == (8, 40)
    if plan.packed is not None:
        _, a, b, mask = prepared.packed
        span_rows = plan.packed.span * 8
        assert a.shape == (20, span_rows) and b.shape == (span_rows, 40)
        assert mask.shape[1] == span_rows
    got = y.clone()
    prepared.run(got, x)
    want = reference(y, x, a_list, b_list, indices, 0.5, (40,))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_rank_cut_blocks_follow_weight_updates():
    """The rank-cut copies of several slots (A and B) follow vLLM's in-place slot writes."""
    gen = torch.Generator().manual_seed(16)
    a_list, b_list = weights(3, 16, 12, (10,), gen, adapter_rank=4)
    a, b = a_list[0], b_list[0]
    cache = LoraWeights(use_onednn=False)
    first = cache.block(a, False, 0, 3, 10, 4), cache.block(b, True, 0, 3, 10, 4)
    a[1, 0, :4].copy_(torch.randn(4, 12, generator=gen))  # a new adapter in slot 1
    b[1, 0, :, :4].copy_(torch.randn(10, 4, generator=gen))
    a_block, b_block = cache.block(a, False, 0, 3, 10, 4), cache.block(b, True, 0, 3, 10, 4)
    assert not torch.equal(a_block, first[0]) and not torch.equal(b_block, first[1])
    torch.testing.assert_close(a_block, a[:, 0, :4].reshape(12, 12).t())
    torch.testing.assert_close(b_block, b[:, 0, :, :4].transpose(1, 2).reshape(12, 10))
