"""What ``loraplex::lora_linear`` computes for one layer in one step, cached at two levels.

A job per slice with live slots (``live``): the plan of the rows it adds to, the weights, the
scale (negated: the merged adapter taken out of other rows) and ``ops.prepare``'s views bound
to the plan's rows.

- Step level: a layer's jobs are reused while the step's plans are the same objects (decode
  steps of an unchanged batch) and vLLM has not written the layer's weights.
- Weight level, below it: which slices are live for the slots the step uses, the rank they
  fit in, and the views per plan layout (``LoraPlan.layout``). A new mapping over the same
  adapters (a request joins or leaves the batch) builds its jobs from these lookups rather
  than looking at every slice's weights again.

Both levels are dropped for a layer when vLLM writes any of its weights (a version counter
moves); nothing here computes on activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraplex.fastlora import ops
from loraplex.fastlora.live import LiveSlots
from loraplex.fastlora.plan import LoraPlan
from loraplex.fastlora.weights import LoraWeights

#: One slice of one layer in one step: (plan, A, B, scale, offset, size, prepared views).
LayerJob = tuple[LoraPlan, torch.Tensor, torch.Tensor, float, int, int, ops.PreparedSlice | None]

#: Weight views kept per slice (one per plan layout and output width); cleared beyond.
MAX_LAYOUTS_PER_SLICE = 64


@dataclass
class SlicePart:
    """One live slice of a layer for a set of slots in use: a ``LayerJob`` without its rows."""

    subtract: bool
    """Whether it takes the merged adapter out (the subtraction plan), else adds the live slots'."""
    live: tuple[int, ...]
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float
    offset: int
    size: int
    rank: int
    views: dict[tuple, ops.SliceWeights | None] = field(default_factory=dict)
    """``ops.prepare``'s views per (plan layout, output width)."""

    def job(self, plan: LoraPlan, y_width: int, weights: LoraWeights) -> LayerJob:
        """This slice's job for ``plan`` (the token plan, or the subtraction plan)."""
        sub = plan if self.subtract else plan.only(self.live)
        key = (sub.layout, y_width)
        if key not in self.views:
            if len(self.views) >= MAX_LAYOUTS_PER_SLICE:
                self.views.clear()
            self.views[key] = ops.prepare(
                sub, y_width, self.lora_a, self.lora_b, self.scale, self.offset, self.size,
                weights, self.rank,
            )  # fmt: skip
        views = self.views[key]
        prepared = None if views is None else views.bind(sub)
        return sub, self.lora_a, self.lora_b, self.scale, self.offset, self.size, prepared


class LayerJobs:
    """Per-engine cache of the layers' jobs (one per punica wrapper)."""

    def __init__(self, live: LiveSlots, weights: LoraWeights) -> None:
        self._live = live
        self._weights = weights
        self._steps: dict[int, tuple] = {}
        self._parts: dict[int, tuple] = {}

    def get(
        self,
        plan: LoraPlan,
        subtract: LoraPlan | None,
        lora_a_stacked: list[torch.Tensor],
        lora_b_stacked: list[torch.Tensor],
        scale: float,
        output_slices: list[int],
        y_width: int,
    ) -> list[LayerJob]:
        """The jobs of the layer whose slices are ``lora_*_stacked`` in this step.

        ``plan``: the step's rows per slot; ``subtract``: the rows the merged adapter is taken
        out of (None when nothing is merged). The views are cut to the rank the slots' adapters
        fit in (``LiveSlots.rank``)."""
        versions = tuple(t._version for t in lora_a_stacked) + tuple(
            t._version for t in lora_b_stacked
        )
        first = lora_a_stacked[0]
        hit = self._steps.get(first.data_ptr())
        if (
            hit is not None
            and hit[0] is first
            and hit[1] is plan
            and hit[2] is subtract
            and hit[3] == versions
            and hit[4] == (scale, y_width)
        ):
            return hit[5]
        used = (plan.slots, None if subtract is None else subtract.slots)
        parts = self._slice_parts(
            versions, used, lora_a_stacked, lora_b_stacked, scale, output_slices
        )
        jobs = [
            part.job(subtract if part.subtract else plan, y_width, self._weights) for part in parts
        ]
        self._steps[first.data_ptr()] = (first, plan, subtract, versions, (scale, y_width), jobs)
        return jobs

    def _slice_parts(
        self,
        versions: tuple[int, ...],
        used: tuple[tuple[int, ...], tuple[int, ...] | None],
        lora_a_stacked: list[torch.Tensor],
        lora_b_stacked: list[torch.Tensor],
        scale: float,
        output_slices: list[int],
    ) -> list[SlicePart]:
        """The layer's live slices for ``used``: the slots of the token plan and of the
        subtraction plan (None: nothing merged)."""
        first = lora_a_stacked[0]
        slots, subtract_slots = used
        key = (versions, used, scale)
        hit = self._parts.get(first.data_ptr())
        if hit is not None and hit[0] is first and hit[1] == key:
            return hit[2]
        parts = []
        offset = 0
        for lora_a, lora_b, size in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
            live = self._live.live(slots, lora_a, lora_b)
            subtracts = bool(subtract_slots) and bool(
                self._live.live(subtract_slots, lora_a, lora_b)
            )
            if live or subtracts:
                rank = self._live.rank(lora_a)
                if live:
                    parts.append(SlicePart(False, live, lora_a, lora_b, scale, offset, size, rank))
                if subtracts:
                    parts.append(SlicePart(True, (), lora_a, lora_b, -scale, offset, size, rank))
            offset += size
        self._parts[first.data_ptr()] = (first, key, parts)
        return parts
