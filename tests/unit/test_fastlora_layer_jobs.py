"""``layer_jobs``: a layer's cached jobs after vLLM writes a slot, against a direct product."""

from __future__ import annotations

import torch

from loraplex.fastlora.layer_jobs import LayerJobs
from loraplex.fastlora.live import LiveSlots
from loraplex.fastlora.plan import LoraPlan
from loraplex.fastlora.slot_writes import SlotWrites
from loraplex.fastlora.weights import LoraWeights

SLOTS, RANK, IN, OUT, SCALE = 3, 8, 32, 24, 0.5


def write(lora_a: torch.Tensor, lora_b: torch.Tensor, slot: int, rank: int, seed: int) -> None:
    """An adapter of ``rank`` into ``slot`` in place, as vLLM's activation does (rows of A
    from the rank on, and columns of B, zero)."""
    generator = torch.Generator().manual_seed(seed)
    lora_a[slot].zero_()
    lora_b[slot].zero_()
    lora_a[slot, 0, :rank] = torch.randn(rank, IN, generator=generator)
    lora_b[slot, 0, :, :rank] = torch.randn(OUT, rank, generator=generator)


def expected(x: torch.Tensor, indices: list[int], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    rows = [SCALE * x[i] @ a[s, 0].T @ b[s, 0].T for i, s in enumerate(indices)]
    return torch.stack(rows)


def run(jobs: list, rows: int, x: torch.Tensor) -> torch.Tensor:
    y = torch.zeros(rows, OUT)
    for _plan, _a, _b, _scale, _offset, _size, prepared in jobs:
        prepared.run(y, x)
    return y


def test_jobs_follow_a_write_over_a_slot_in_use() -> None:
    """A decode step over all slots (one packed group, whose B is a copy), then a new
    adapter of the same rank written into slot 1: the layer's parts are kept, and the next
    step computes with the new weights, not the copy of the old ones."""
    writes = SlotWrites()
    live, weights = LiveSlots(writes), LoraWeights(use_onednn=False, writes=writes)
    jobs = LayerJobs(live, weights)
    lora_a, lora_b = torch.zeros(SLOTS, 1, 16, IN), torch.zeros(SLOTS, 1, OUT, 16)
    for slot in range(SLOTS):
        write(lora_a, lora_b, slot, RANK, seed=slot)
        writes.written(slot, SLOTS)
    indices = [0, 1, 2, 1]
    x = torch.randn(len(indices), IN)

    def step() -> tuple[torch.Tensor, object]:
        plan = LoraPlan.build(torch.tensor(indices))  # a new plan object, as each step has
        assert plan.packed is not None and plan.packed.span == SLOTS
        got = jobs.get(plan, None, [lora_a], [lora_b], SCALE, [OUT], OUT)
        layer = jobs._layers[lora_a.data_ptr()]
        return run(got, len(indices), x), layer

    first, layer = step()
    torch.testing.assert_close(first, expected(x, indices, lora_a, lora_b))

    write(lora_a, lora_b, 1, RANK, seed=10)
    writes.written(1, SLOTS)
    live.written(1, lora_a, lora_b, RANK)
    second, kept = step()
    assert kept is layer  # same live slots and rank: the parts were kept
    torch.testing.assert_close(second, expected(x, indices, lora_a, lora_b))
    assert not torch.allclose(second, first)

    write(lora_a, lora_b, 2, RANK // 2, seed=11)  # a lower rank: the slice's rank stands
    writes.written(2, SLOTS)
    live.written(2, lora_a, lora_b, RANK // 2)
    third, after_lower_rank = step()
    torch.testing.assert_close(third, expected(x, indices, lora_a, lora_b))
    assert after_lower_rank is kept
    write(lora_a, lora_b, 0, 0, seed=12)  # slot 0 now all zero: no longer live
    writes.written(0, SLOTS)
    live.written(0, lora_a, lora_b, 0)
    fourth, other = step()
    assert other is not kept
    torch.testing.assert_close(fourth, expected(x, indices, lora_a, lora_b))
