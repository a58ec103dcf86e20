"""What ``loraplex::lora_linear`` computes for one layer in one step, cached at three levels.

A job per slice with live slots (``live``): the plan of the rows it adds to, the weights, the
scale (negated: the merged adapter taken out of other rows) and ``ops.prepare``'s views bound
to the plan's rows.

- Step level: a layer's jobs are reused while the step's plans are the same objects (decode
  steps of an unchanged batch) and vLLM has not written the layer's weights.
- Slot level, looked at again when vLLM writes the layer's weights (a version counter moves):
  which slots are live in each slice, over every slot, and the rank each slice fits in. A
  write that leaves them as they were (a load into a slot in use, of an adapter of the same
  modules and rank) keeps the levels below, save the views of copied blocks. A step's
  slots are cut to those live somewhere in the layer, so a batch that gains or loses an
  adapter that leaves the layer at zero (the k, o, gate, up and down slices of a q/v adapter)
  finds the layer's parts as they were.
- Part level, below it: per set of live slots in use, the slices to compute and their views
  per plan layout (``LoraPlan.layout``). A new mapping over the same adapters (a request
  joins or leaves the batch) binds these views to its rows rather than looking at every
  slice's weights again.

Nothing here computes on activations.
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

#: Entries kept per layer (sets of slots in use) and per slice (plan layouts); cleared beyond.
MAX_CACHED = 64


@dataclass
class SlicePart:
    """One live slice of a layer for a set of slots in use: a ``LayerJob`` without its rows."""

    subtract: bool
    """Whether it takes the merged adapter out (the subtraction plan), else adds the live slots'."""
    live: tuple[int, ...]
    live_slice: LiveSlice
    scale: float
    views: dict[tuple, ops.SliceWeights | None] = field(default_factory=dict)
    """``ops.prepare``'s views per (plan layout, output width)."""

    def job(self, plan: LoraPlan, y_width: int, weights: LoraWeights) -> LayerJob:
        """This slice's job for ``plan`` (the token plan, or the subtraction plan)."""
        sub = plan if self.subtract else plan.only(self.live)
        s = self.live_slice
        key = (sub.layout, y_width)
        if key not in self.views:
            if len(self.views) >= MAX_CACHED:
                self.views.clear()
            self.views[key] = ops.prepare(
                sub, y_width, s.lora_a, s.lora_b, self.scale, s.offset, s.size, weights, s.rank,
                s.slot_views,
            )  # fmt: skip
        views = self.views[key]
        prepared = None if views is None else views.bind(sub)
        return sub, s.lora_a, s.lora_b, self.scale, s.offset, s.size, prepared


@dataclass(slots=True)
class LiveSlice:
    """A slice of a layer with live slots, at one version of its weights."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    offset: int
    size: int
    live: frozenset[int]
    """Every slot whose A and B are both nonzero here."""
    rank: int
    """The rank every slot fits in: rows of A beyond it are zero in all slots (vLLM pads
    adapters of lower rank than ``max_lora_rank``), so products over them add nothing. One
    bound for all slots, so that a row's products do not depend on which adapters its batch
    holds."""
    slot_views: ops.SlotViews = field(default_factory=dict)
    """One slot's views (``ops.prepare``'s cache; a prefill's layout is new in most steps),
    shared by the parts of this version and handed on to the layer's next one."""


@dataclass
class LiveLayer:
    """A layer's slices at one version of its weights, and its parts per slots in use."""

    first: torch.Tensor
    """The first slice's A: the layer's cache entry holds it, so its address is not reused."""
    versions: tuple[int, ...]
    bounds: tuple[tuple[frozenset[int], int], ...]
    """Per slice (live or not), its live slots and rank (``LiveSlots.bounds``): while they
    stand, a write leaves the slices and their parts as they are."""
    slices: tuple[LiveSlice, ...]
    slots: frozenset[int]
    """The slots live in any slice."""
    parts: dict[tuple, list[SlicePart]] = field(default_factory=dict)

    def drop_copied_views(self) -> None:
        """Forget the views that read a copy of several slots (a packed group's blocks,
        ``weights.block``): vLLM has written a slot, and only views of its stacked tensors
        follow that. One slot's views are kept."""
        for parts in self.parts.values():
            for part in parts:
                part.views = {
                    key: views
                    for key, views in part.views.items()
                    if views is None or views.packed is None
                }

    def parts_for(
        self, used: tuple[int, ...], subtract: tuple[int, ...] | None, scale: float
    ) -> list[SlicePart]:
        """The slices to compute for the token plan's slots ``used`` (live here) and the
        subtraction plan's ``subtract`` (None: nothing merged)."""
        key = (used, subtract, scale)
        parts = self.parts.get(key)
        if parts is not None:
            return parts
        parts = []
        for s in self.slices:
            live = _within(used, s.live)
            if live:
                parts.append(SlicePart(False, live, s, scale))
            if subtract and not s.live.isdisjoint(subtract):
                parts.append(SlicePart(True, (), s, -scale))
        if len(self.parts) >= MAX_CACHED:
            self.parts.clear()
        self.parts[key] = parts
        return parts


class LayerJobs:
    """Per-engine cache of the layers' jobs (one per punica wrapper)."""

    def __init__(self, live: LiveSlots, weights: LoraWeights) -> None:
        self._live = live
        self._weights = weights
        self._steps: dict[int, tuple] = {}
        self._layers: dict[int, LiveLayer] = {}

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
        fit in (``LiveSlice.rank``)."""
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
        layer = self._layer(versions, lora_a_stacked, lora_b_stacked, output_slices)
        jobs = []
        if layer.slots:
            used = _within(plan.slots, layer.slots)
            subtracted = None if subtract is None else _within(subtract.slots, layer.slots)
            jobs = [
                part.job(subtract if part.subtract else plan, y_width, self._weights)
                for part in layer.parts_for(used, subtracted, scale)
            ]
        self._steps[first.data_ptr()] = (first, plan, subtract, versions, (scale, y_width), jobs)
        return jobs

    def _layer(
        self,
        versions: tuple[int, ...],
        lora_a_stacked: list[torch.Tensor],
        lora_b_stacked: list[torch.Tensor],
        output_slices: list[int],
    ) -> LiveLayer:
        """The layer's live slots per slice at ``versions`` of its weights."""
        first = lora_a_stacked[0]
        layer = self._layers.get(first.data_ptr())
        if layer is not None and layer.first is not first:
            layer = None
        if layer is not None and layer.versions == versions:
            return layer
        bounds = tuple(
            self._live.bounds(lora_a, lora_b)
            for lora_a, lora_b in zip(lora_a_stacked, lora_b_stacked, strict=True)
        )
        if layer is not None and layer.bounds == bounds:
            # a slot written over with weights of the same modules and rank (a load into a
            # slot in use): the parts stand, save the views of copied blocks
            layer.versions = versions
            layer.drop_copied_views()
            return layer
        # views of one slot follow vLLM's in-place writes: the layer's next version keeps them
        views = {} if layer is None else {s.offset: s.slot_views for s in layer.slices}
        slices = []
        offset = 0
        for lora_a, lora_b, size, (live, rank) in zip(
            lora_a_stacked, lora_b_stacked, output_slices, bounds, strict=True
        ):
            if live:
                slot_views = views.get(offset, {})
                slices.append(LiveSlice(lora_a, lora_b, offset, size, live, rank, slot_views))
            offset += size
        slots = frozenset().union(*(s.live for s in slices))
        layer = LiveLayer(first, versions, bounds, tuple(slices), slots)
        self._layers[first.data_ptr()] = layer
        return layer


def _within(slots: tuple[int, ...], live: frozenset[int]) -> tuple[int, ...]:
    """Those of ``slots`` in ``live``, in order (most often all of them: ``slots`` itself)."""
    if live.issuperset(slots):
        return slots
    return tuple(slot for slot in slots if slot in live)
