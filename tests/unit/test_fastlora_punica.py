"""FastPunicaWrapperCPU through vLLM's own metadata path (LoRAMapping -> update_metadata).

Each entry point of the wrapper is compared with a per-token reference, and, where vLLM's
stock CPU wrapper is right (no token without an adapter), with vLLM itself.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from vllm.lora.layers.utils import LoRAMapping  # noqa: E402
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # noqa: E402

from loraplex.fastlora.punica import FastPunicaWrapperCPU  # noqa: E402

SLOT_IDS = [7, 3, 9]  # lora ids in slots 0, 1, 2
SLICES = (40, 12, 12)
RANK, D_IN = 16, 32


def wrappers(token_ids, prompt_ids):
    made = []
    for cls in (FastPunicaWrapperCPU, PunicaWrapperCPU):
        wrapper = cls(64, 8, "cpu")
        mapping = LoRAMapping(token_ids, prompt_ids, is_prefill=True)
        wrapper.update_metadata(mapping, list(SLOT_IDS), len(SLOT_IDS) + 1, 1000)
        made.append(wrapper)
    return made


def stacked(gen, slices=SLICES):
    a = tuple(torch.randn(3, 1, RANK, D_IN, generator=gen) * 0.3 for _ in slices)
    b = tuple(torch.randn(3, 1, size, RANK, generator=gen) * 0.3 for size in slices)
    return a, b


def reference(y, x, a, b, slots, scale=1.0):
    out = y.clone()
    offset = 0
    for a_s, b_s in zip(a, b, strict=True):
        size = b_s.shape[2]
        for row, slot in enumerate(slots):
            if slot >= 0:
                h = (x[row] @ a_s[slot, 0].t()) * scale
                out[row, offset : offset + size] += h @ b_s[slot, 0].t()
        offset += size
    return out


def slots_of(ids):
    return [SLOT_IDS.index(i) if i > 0 else -1 for i in ids]


TOKENS = {
    "prefill+decode": [7] * 20 + [3] * 2 + [9, 7, 3] + [9] * 18,
    "decode mixed": [7, 3, 9, 9, 7, 3, 7, 9],
    "with base": [0, 0, 9, 7] + [0] * 17 + [9] * 3 + [3, 0],
}


@pytest.mark.parametrize("name", sorted(TOKENS))
def test_add_lora_linear(name):
    ids = TOKENS[name]
    gen = torch.Generator().manual_seed(len(ids))
    a, b = stacked(gen)
    x = torch.randn(len(ids), D_IN, generator=gen)
    y = torch.randn(len(ids), sum(SLICES), generator=gen)
    fast, stock = wrappers(ids, ids)
    expected = reference(y, x, a, b, slots_of(ids))
    got = y.clone()
    fast.add_lora_linear(got, x, a, b, 1.0, SLICES)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    if 0 not in ids:
        vllm_out = y.clone()
        stock.add_lora_linear(vllm_out, x, a, b, 1.0, SLICES)
        torch.testing.assert_close(got, vllm_out, rtol=1e-5, atol=1e-4)


def test_base_tokens_next_to_the_last_slot_get_no_delta():
    """vLLM's stock CPU ops index slot -1 as the last slot; ours leave base rows alone."""
    ids = [9, 0, 9, 0]
    gen = torch.Generator().manual_seed(5)
    a, b = stacked(gen)
    x = torch.randn(4, D_IN, generator=gen)
    y = torch.randn(4, sum(SLICES), generator=gen)
    fast, _ = wrappers(ids, ids)
    got = y.clone()
    fast.add_lora_linear(got, x, a, b, 1.0, SLICES)
    torch.testing.assert_close(got[[1, 3]], y[[1, 3]])
    assert not torch.allclose(got[[0, 2]], y[[0, 2]])


@pytest.mark.parametrize("name", sorted(TOKENS))
def test_shrink_and_expand_with_buffers(name):
    ids = TOKENS[name]
    gen = torch.Generator().manual_seed(11)
    a, b = stacked(gen)
    x = torch.randn(len(ids), D_IN, generator=gen)
    y = torch.randn(len(ids), sum(SLICES), generator=gen)
    fast, _ = wrappers(ids, ids)
    buffers = tuple(torch.empty(len(ids), RANK) for _ in SLICES)
    got = y.clone()
    fast.add_shrink(buffers, x, a, 0.5)
    fast.add_expand(got, buffers, b, SLICES, add_inputs=True)
    torch.testing.assert_close(got, reference(y, x, a, b, slots_of(ids), 0.5), atol=1e-4, rtol=1e-5)


def test_logits_use_the_sampler_mapping():
    tokens = [7] * 5 + [0] * 3 + [9] * 4
    prompts = [7, 0, 9]
    gen = torch.Generator().manual_seed(2)
    a, b = stacked(gen, (50,))
    x = torch.randn(3, D_IN, generator=gen)
    logits = torch.randn(3, 48, generator=gen)
    fast, _ = wrappers(tokens, prompts)
    got = logits.clone()
    fast.add_lora_logits(got, x, a[0], b[0], 1.0)
    padded = torch.cat([logits, torch.zeros(3, 2)], dim=1)
    expected = reference(padded, x, a, b, slots_of(prompts))[:, :48]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_embedding_expand():
    ids = [3, 0, 3, 9]
    gen = torch.Generator().manual_seed(4)
    b = torch.randn(3, 1, 20, RANK, generator=gen)
    h = torch.randn(4, RANK, generator=gen)
    y = torch.randn(4, 20, generator=gen)
    fast, _ = wrappers(ids, ids)
    got = y.clone()
    fast.add_lora_embedding(got, h, b)
    for row, slot in enumerate(slots_of(ids)):
        want = y[row] if slot < 0 else y[row] + h[row] @ b[slot, 0].t()
        torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-4)


def test_rows_that_do_not_match_the_mapping_never_raise():
    """Padded rows get no adapter, a shorter input uses the mapping's first rows: no
    request shape can make the forward pass raise."""
    ids = [7, 7, 3]
    fast, _ = wrappers(ids, [7, 3])
    gen = torch.Generator().manual_seed(0)
    a, b = stacked(gen)
    x = torch.randn(5, D_IN, generator=gen)
    y = torch.randn(5, sum(SLICES), generator=gen)
    for rows, slots in [(5, [*slots_of(ids), -1, -1]), (2, slots_of(ids[:2]))]:
        got = y[:rows].clone()
        fast.add_lora_linear(got, x[:rows], a, b, 1.0, SLICES)
        want = reference(y[:rows], x[:rows], a, b, slots)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        buffers = tuple(torch.empty(rows, RANK) for _ in SLICES)
        got = y[:rows].clone()
        fast.add_shrink(buffers, x[:rows], a, 1.0)
        fast.add_expand(got, buffers, b, SLICES, add_inputs=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_logits_of_every_token_use_the_token_mapping():
    """Prompt logprobs compute logits for every token, not one row per request."""
    tokens = [7] * 3 + [0] * 2 + [9] * 2
    fast, _ = wrappers(tokens, [7, 0, 9])
    gen = torch.Generator().manual_seed(3)
    a, b = stacked(gen, (48,))
    x = torch.randn(len(tokens), D_IN, generator=gen)
    logits = torch.randn(len(tokens), 48, generator=gen)
    got = logits.clone()
    fast.add_lora_logits(got, x, a[0], b[0], 1.0)
    expected = reference(logits, x, a, b, slots_of(tokens))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", sorted(TOKENS))
def test_slices_and_slots_with_zero_weights_are_left_out(name, monkeypatch):
    """Like adapters of q and v only: the k slice is zero in every slot, the v slice in
    slot 1. The result is unchanged and the k slice is never computed."""
    from loraplex.fastlora import ops

    ids = TOKENS[name]
    gen = torch.Generator().manual_seed(len(ids) + 1)
    a, b = stacked(gen)
    a[1].zero_()
    b[1].zero_()
    b[2][1].zero_()
    x = torch.randn(len(ids), D_IN, generator=gen)
    y = torch.randn(len(ids), sum(SLICES), generator=gen)
    fast, _ = wrappers(ids, ids)
    calls = []
    real = ops.prepare

    def spy(plan, y_width, lora_a, *args):
        calls.append((next(i for i, t in enumerate(a) if t is lora_a), plan.slots))
        return real(plan, y_width, lora_a, *args)

    monkeypatch.setattr(ops, "prepare", spy)
    got = y.clone()
    fast.add_lora_linear(got, x, a, b, 1.0, SLICES)
    torch.testing.assert_close(got, reference(y, x, a, b, slots_of(ids)), rtol=1e-5, atol=1e-4)
    used = tuple(sorted({s for s in slots_of(ids) if s >= 0}))
    assert used == (0, 1, 2)
    assert calls == [(0, (0, 1, 2)), (2, (0, 2))]


def test_a_slice_written_between_steps_of_one_mapping_is_computed_again():
    """The layer's work is cached per step mapping, and a weight write (an adapter loaded
    into a slot while the mapping stays) is seen: a slice that was zero and is now written
    adds its delta, and one zeroed again adds none."""
    ids = TOKENS["decode mixed"]
    gen = torch.Generator().manual_seed(5)
    a, b = stacked(gen)
    written_a, written_b = a[1].clone(), b[1].clone()
    a[1].zero_()
    b[1].zero_()
    x = torch.randn(len(ids), D_IN, generator=gen)
    y = torch.randn(len(ids), sum(SLICES), generator=gen)
    fast, _ = wrappers(ids, ids)
    for _ in range(2):
        for write in (None, (written_a, written_b), (torch.zeros_like(a[1]), written_b)):
            if write is not None:
                a[1].copy_(write[0])
                b[1].copy_(write[1])
            got = y.clone()
            fast.add_lora_linear(got, x, a, b, 0.5, SLICES)
            want = reference(y, x, a, b, slots_of(ids), scale=0.5)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def run_mappings(monkeypatch, a, b, steps, seed):
    """Each ``(ids, lookups)`` of ``steps`` as a step of one wrapper (vLLM's
    ``update_metadata``): its rows equal a per-token reference, and the layer's weight views
    (``ops.prepare``) were looked up ``lookups`` times."""
    from loraplex.fastlora import ops

    gen = torch.Generator().manual_seed(seed)
    rows = max(len(ids) for ids, _ in steps)
    x = torch.randn(rows, D_IN, generator=gen)
    y = torch.randn(rows, sum(SLICES), generator=gen)
    prepared = []
    real = ops.prepare

    def spy(plan, *args):
        prepared.append(plan.layout)
        return real(plan, *args)

    monkeypatch.setattr(ops, "prepare", spy)
    fast, _ = wrappers(steps[0][0], steps[0][0])
    for ids, lookups in steps:
        prepared.clear()
        mapping = LoRAMapping(ids, ids, is_prefill=True)
        fast.update_metadata(mapping, list(SLOT_IDS), len(SLOT_IDS) + 1, 1000)
        got = y[: len(ids)].clone()
        fast.add_lora_linear(got, x[: len(ids)], a, b, 0.5, SLICES)
        want = reference(y[: len(ids)], x[: len(ids)], a, b, slots_of(ids), scale=0.5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, msg=str(ids))
        assert len(prepared) == lookups, ids


def test_a_new_mapping_over_the_same_adapters_reuses_the_weight_views(monkeypatch):
    """A request joining or leaving the batch gives a new mapping: the layer's weight views
    are looked up again only for a new layout (which slots go direct, which are packed),
    and every mapping's rows get their own slot's delta."""
    a, b = stacked(torch.Generator().manual_seed(11))
    steps = [
        ([7, 3, 9, 9, 7, 3, 7, 9], 3),  # first step: one packed group, views per slice
        ([9, 7, 3, 7, 9, 3, 3, 7], 0),  # other rows, same layout: no lookup
        ([3, 9, 7], 0),
        ([7] * 20 + [3, 9], 3),  # slot 0 direct, 1 and 2 packed: a new layout
        ([3, 9, 7], 0),  # seen before
    ]
    run_mappings(monkeypatch, a, b, steps, seed=11)


def test_an_adapter_zero_in_a_layer_joins_the_batch_without_a_new_lookup(monkeypatch):
    """A q/v adapter leaves the k, o, gate, up and down layers at zero: its requests joining
    or leaving the batch keep those layers' parts and views (a cold load writes one slot and
    adds it to the batch in all 120 layers of the model), and its rows get no delta there."""
    a, b = stacked(torch.Generator().manual_seed(13))
    for t in (*a, *b):
        t[2].zero_()  # slot 2 (lora id 9): nothing in this layer
    steps = [
        ([7, 3, 7, 3], 3),  # one packed group of slots 0-1 in each of the 3 slices
        ([7, 9, 3, 9, 7, 3], 0),  # 9 joins: its rows are base rows here, same layout
        ([9, 7, 3], 0),
        ([7, 3, 7, 3, 7], 0),  # 9 leaves
    ]
    run_mappings(monkeypatch, a, b, steps, seed=13)
