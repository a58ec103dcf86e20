"""Slots with zero weights (modules an adapter does not adapt) are left out of the LoRA ops."""

from __future__ import annotations

import pytest
import torch

from loraplex.fastlora.live import LiveSlots
from loraplex.fastlora.plan import LONG_SEGMENT, LoraPlan


def test_row_bounds_mark_nonzero_slots_and_follow_in_place_writes():
    live = LiveSlots()
    stacked = torch.zeros(4, 1, 3, 5)
    stacked[2, 0, 1, 4] = 0.5
    assert live.rows(stacked) == (0, 0, 2, 0)  # slot 2: rows from 2 on are zero
    stacked[0] = 1.0  # how vLLM writes an adapter into a slot: in place
    assert live.rows(stacked) == (3, 0, 2, 0)
    stacked[2] = 0  # and how it resets one (reset_lora)
    assert live.rows(stacked) == (3, 0, 0, 0)


def test_live_needs_both_a_and_b_nonzero_in_a_used_slot():
    live = LiveSlots()
    a = torch.zeros(3, 1, 2, 4)
    b = torch.zeros(3, 1, 6, 2)
    a[0], b[0] = 1.0, 1.0  # slot 0: both
    a[1] = 1.0  # slot 1: A only, adds zero
    b[2] = 1.0  # slot 2: B only, adds zero
    assert live.live((0, 1, 2), a, b) == (0,)
    assert live.live((1, 2), a, b) == ()


def test_bounds_give_a_slices_live_slots_and_the_rank_every_slot_fits_in():
    live = LiveSlots()
    a = torch.zeros(3, 1, 8, 4)
    b = torch.zeros(3, 1, 6, 8)
    assert live.bounds(a, b) == (frozenset(), 0)  # a slice no adapter adapts
    a[0, 0, :2], b[0] = 1.0, 1.0  # slot 0: rank 2, live
    a[1, 0, :5] = 1.0  # slot 1: rank 5 in A, but B zero: adds nothing
    assert live.bounds(a, b) == (frozenset({0}), 5)
    b[1] = 1.0  # written in place, as vLLM does
    assert live.bounds(a, b) == (frozenset({0, 1}), 5)


def test_only_turns_tokens_of_other_slots_into_base_tokens():
    n = LONG_SEGMENT
    indices = torch.tensor([0, 1, 2, -1] + [1] * n + [2, 0])
    plan = LoraPlan.build(indices)
    assert plan.slots == (0, 1, 2)
    assert plan.only((0, 1, 2)) is plan
    sub = plan.only((0, 2))
    assert sub is plan.only((0, 2))
    assert sub.slots == (0, 2)
    assert sub.direct == []
    assert sub.packed is not None
    assert sub.packed.rows == slice(0, n + 6)
    expected = torch.where(torch.isin(indices, torch.tensor([0, 2])), indices, -1)
    assert sub.packed.onehot.argmax(1).tolist() == [max(i, 0) for i in expected.tolist()]
    assert sub.packed.onehot.sum(1).tolist() == [float(i >= 0) for i in expected.tolist()]


@pytest.mark.parametrize("slots", [(0,), (1,), (0, 1)])
def test_only_of_one_slot_has_no_packed_group_beyond_its_runs(slots):
    plan = LoraPlan.build(torch.tensor([0, 1, 0, 1]))
    sub = plan.only(slots)
    assert sub.slots == slots
    covered = [row for _, start, stop in sub.direct for row in range(start, stop)]
    if sub.packed is not None:
        covered += [
            row
            for row, used in zip(range(4)[sub.packed.rows], sub.packed.onehot.sum(1), strict=True)
            if used
        ]
    assert sorted(covered) == [row for row, slot in enumerate([0, 1, 0, 1]) if slot in slots]


def test_row_bounds_are_the_last_nonzero_row_of_each_slot_and_follow_writes():
    """vLLM pads an adapter of rank r into the first r rows of a slot of ``max_lora_rank``
    rows: the ops need only as many rows as the largest adapter held."""
    live = LiveSlots()
    a = torch.zeros(3, 1, 16, 5)
    a[0, 0, :4] = 1.0
    a[2, 0, 7, 1] = -2.0  # a rank-8 adapter whose last row is mostly zero
    assert live.rows(a) == (4, 0, 8)
    a[2] = 0  # reset_lora
    assert live.rows(a) == (4, 0, 0)
    a.zero_()
    assert live.rows(a) == (0, 0, 0)
