"""Merging a slot into real oneDNN handles (vLLM's CPU linear) and the wrapper's merged plans.

A layer here is what the wrapper reads of vLLM's LoRA linear layers: its base layer (the kept
weight and its oneDNN handle), its stacked A and B, its output slices. The handles are real.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")
from vllm import _custom_ops  # noqa: E402

if not getattr(_custom_ops, "_supports_onednn", False):
    pytest.skip("vLLM was built without oneDNN", allow_module_level=True)

from vllm.lora.layers.utils import LoRAMapping  # noqa: E402

from loraplex.fastlora import hot_merge  # noqa: E402
from loraplex.fastlora.hot_merge import HotMerge  # noqa: E402
from loraplex.fastlora.hot_policy import HotPolicy  # noqa: E402
from loraplex.fastlora.merge import MergedSlot, unmergeable  # noqa: E402
from loraplex.fastlora.punica import FastPunicaWrapperCPU  # noqa: E402

SLOT_IDS = [7, 3]
SLICES = (24, 8, 8)
RANK, D_IN = 4, 16


def layer(gen: torch.Generator, live_slices=(0, 2)) -> SimpleNamespace:
    weight = torch.randn(sum(SLICES), D_IN, generator=gen)
    lora_a = tuple(torch.randn(2, 1, RANK, D_IN, generator=gen) * 0.3 for _ in SLICES)
    lora_b = tuple(torch.randn(2, 1, size, RANK, generator=gen) * 0.3 for size in SLICES)
    for index in set(range(len(SLICES))) - set(live_slices):
        lora_a[index].zero_()
        lora_b[index].zero_()
    base = SimpleNamespace(
        _loraplex_weight=weight, _loraplex_handle=_custom_ops.create_onednn_mm(weight.t(), 32)
    )
    return SimpleNamespace(
        base_layer=base, lora_a_stacked=lora_a, lora_b_stacked=lora_b, output_slices=SLICES
    )


def forward(wrapper: FastPunicaWrapperCPU, lay: SimpleNamespace, x: torch.Tensor):
    """What vLLM's LoRA linear layer computes: the base linear, then the wrapper's LoRA."""
    y = _custom_ops.onednn_mm(lay.base_layer._loraplex_handle, x, None)
    wrapper.add_lora_linear(y, x, lay.lora_a_stacked, lay.lora_b_stacked, 1.0, SLICES)
    return y


class Decided(HotPolicy):
    """A policy that merges what the test says."""

    def observe(self, tokens):
        return self.merged


def wrapper_for(ids: list[int]) -> FastPunicaWrapperCPU:
    wrapper = FastPunicaWrapperCPU(64, 8, "cpu")
    wrapper.hot_merge = HotMerge(Decided(), wrapper._live, wrapper._writes)
    mapping = LoRAMapping(ids, ids, is_prefill=True)
    wrapper.update_metadata(mapping, list(SLOT_IDS), len(SLOT_IDS) + 1, 1000)
    return wrapper


def test_a_merged_slot_is_in_the_handle_and_restore_gives_back_the_same_bits():
    gen = torch.Generator().manual_seed(0)
    lay = layer(gen)
    x = torch.randn(5, D_IN, generator=gen)
    handle = lay.base_layer._loraplex_handle
    before = _custom_ops.onednn_mm(handle, x, None)
    merged = MergedSlot([(lay, [(0, 0, 24), (2, 32, 8)])], slot=1)
    with pytest.raises(RuntimeError):
        merged.apply()  # nothing packed yet
    assert merged.prepare(seconds=0.0)
    assert torch.equal(_custom_ops.onednn_mm(handle, x, None), before)  # packed, not served
    merged.apply()
    delta = torch.zeros_like(lay.base_layer._loraplex_weight)
    delta[0:24] = lay.lora_b_stacked[0][1, 0] @ lay.lora_a_stacked[0][1, 0]
    delta[32:40] = lay.lora_b_stacked[2][1, 0] @ lay.lora_a_stacked[2][1, 0]
    expected = x @ (lay.base_layer._loraplex_weight + delta).t()
    torch.testing.assert_close(_custom_ops.onednn_mm(handle, x, None), expected)
    merged.restore()
    assert torch.equal(_custom_ops.onednn_mm(handle, x, None), before)


@pytest.mark.parametrize(
    "ids",
    [[7] * 6, [7, 3, 0, 7, 7, 3, 0, 0], [0] * 20 + [7] * 20 + [3] * 18 + [7, 0]],
    ids=["hot only", "mixed decode", "mixed prefill"],
)
def test_merged_outputs_equal_unmerged_for_every_row(ids):
    gen = torch.Generator().manual_seed(len(ids))
    layers = [layer(gen), layer(gen, live_slices=(1,))]
    x = torch.randn(len(ids), D_IN, generator=gen)
    wrapper = wrapper_for(ids)
    unmerged = [forward(wrapper, lay, x) for lay in layers]

    wrapper.hot_merge.policy.merged = 7
    wrapper.step(layers)
    assert wrapper.hot_merge.events == [("merge", 7, 1)]
    merged = [forward(wrapper, lay, x) for lay in layers]
    for got, expected in zip(merged, unmerged, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if set(ids) == {7}:  # all hot: no LoRA math left, the base linear alone
        assert wrapper._linear(len(ids))[0].empty and wrapper._linear(len(ids))[1].empty

    wrapper.hot_merge.policy.merged = None
    wrapper.step(layers)
    assert wrapper.hot_merge.events[-1] == ("unmerge", 7, 2)
    for lay, expected in zip(layers, unmerged, strict=True):
        assert torch.equal(forward(wrapper, lay, x), expected)


def test_a_merge_is_packed_over_steps_and_served_from_the_step_after_the_last(monkeypatch):
    monkeypatch.setattr(hot_merge, "MERGE_SECONDS_PER_STEP", 0.0)  # one layer per step
    ids = [7, 3, 0, 7]
    gen = torch.Generator().manual_seed(4)
    layers = [layer(gen), layer(gen), layer(gen, live_slices=(1,))]
    x = torch.randn(len(ids), D_IN, generator=gen)
    wrapper = wrapper_for(ids)
    unmerged = [forward(wrapper, lay, x) for lay in layers]
    wrapper.hot_merge.policy.merged = 7
    for _ in range(2):
        wrapper.step(layers)
        assert wrapper.hot_merge.lora_id is None and wrapper.hot_merge.events == []
        for lay, expected in zip(layers, unmerged, strict=True):
            assert torch.equal(forward(wrapper, lay, x), expected)  # still the unmerged path
    wrapper.step(layers)
    assert wrapper.hot_merge.lora_id == 7 and wrapper.hot_merge.events == [("merge", 7, 3)]
    for lay, expected in zip(layers, unmerged, strict=True):
        torch.testing.assert_close(forward(wrapper, lay, x), expected, rtol=1e-5, atol=1e-5)


def test_a_merge_being_packed_is_dropped_when_its_slot_is_written(monkeypatch):
    monkeypatch.setattr(hot_merge, "MERGE_SECONDS_PER_STEP", 0.0)
    gen = torch.Generator().manual_seed(5)
    layers = [layer(gen), layer(gen)]
    wrapper = wrapper_for([7] * 4)
    wrapper.hot_merge.policy.merged = 7
    wrapper.step(layers)  # one of two layers packed
    wrapper._writes.written(0, 2)
    wrapper.step(layers)  # dropped, and the policy starts over
    assert wrapper.hot_merge.events == [] and wrapper.hot_merge.policy.merged is None


def test_rows_beyond_the_mapping_keep_no_delta_while_merged():
    ids = [7, 3, 0]
    gen = torch.Generator().manual_seed(1)
    layers = [layer(gen)]
    wrapper = wrapper_for(ids)
    wrapper.hot_merge.policy.merged = 7
    wrapper.step(layers)
    x = torch.randn(5, D_IN, generator=gen)  # two rows more than the mapping: base rows
    got = forward(wrapper, layers[0], x)
    wrapper.hot_merge.policy.merged = None
    wrapper.step(layers)
    torch.testing.assert_close(got, forward(wrapper, layers[0], x), rtol=1e-5, atol=1e-5)


def test_a_rewritten_merged_slot_is_unmerged_before_the_next_step():
    gen = torch.Generator().manual_seed(2)
    layers = [layer(gen)]
    wrapper = wrapper_for([7] * 4)
    wrapper.hot_merge.policy.merged = 7
    wrapper.step(layers)
    wrapper._writes.written(0, 2)  # vLLM wrote another adapter (or zeros) into slot 0
    wrapper.step(layers)
    assert [event[0] for event in wrapper.hot_merge.events] == ["merge", "unmerge"]
    assert wrapper.hot_merge.policy.merged is None


def test_layers_that_cannot_be_merged_turn_merging_off():
    gen = torch.Generator().manual_seed(3)
    lay = layer(gen)
    lay.base_layer._loraplex_handle = None
    assert "oneDNN" in unmergeable(lay)
    wrapper = wrapper_for([7] * 4)
    wrapper.hot_merge.policy.merged = 7
    wrapper.step([lay])
    assert wrapper.hot_merge.policy is None and wrapper.hot_merge.events == []
