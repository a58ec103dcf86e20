"""CPU multi-LoRA ops that never copy adapter weights per token.

Weights come in vLLM's stacked layout: A ``(slots, 1, rank, in)`` and B ``(slots, 1, out, rank)``
(a 3-D layout without the 1 works too); ``weights.LoraWeights`` serves them prepacked. A
``LoraPlan`` says which rows use which slot. Direct segments multiply by one slot's A and B;
the packed group multiplies by the contiguous block of slots it uses and masks out the other
slots' columns. Rows with slot -1 get no delta.

``lora_linear`` fuses shrink and expand (the hot path of every linear layer); ``shrink`` and
``expand`` keep vLLM's two-step interface (a ``(tokens, rank)`` buffer in between) for callers
that use it. These functions only compute; choosing the plan is ``plan``'s job and wiring into
vLLM is ``punica``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.fastlora.plan import LoraPlan
from loraplex.fastlora.weights import LoraWeights, add_cast, slots

#: One slot's (A view, B view) of a slice per (slot, size, rank): ``prepare``'s cache.
SlotViews = dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(slots=True)
class PreparedSlice:
    """``lora_linear`` for one plan and one slice: ``SliceWeights`` with the plan's rows.

    Only where nothing is prepacked and one dtype runs through (float32 serving): each
    product is then a plain ``mm`` or ``addmm_`` on views of vLLM's stacked weights, which
    follow its in-place slot writes (a B block of several slots is a transposed copy, valid
    until vLLM writes B again). Decode steps are dominated by per-op overhead, so rows that
    are the whole input are not sliced at all (``None`` rows). Every path adds with one
    ``addmm_``, so in 16-bit dtypes a row's bits do not depend on the path its batch takes.
    """

    dtype: torch.dtype
    num_rows: int
    offset: int
    size: int
    scale: float
    direct: tuple[tuple[slice | None, torch.Tensor, torch.Tensor], ...]
    """(rows, A view ``(in, rank)``, B view ``(rank, size)``) per direct segment."""
    packed: tuple[slice | torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor] | None
    """(rows, A block, B block, mask times scale) of the packed group."""

    def accepts(self, y: torch.Tensor, x: torch.Tensor) -> bool:
        """Whether ``run`` computes this call: the plan's rows and dtype."""
        return x.shape[0] == self.num_rows and x.dtype == self.dtype and y.dtype == self.dtype

    def run(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """``y[:, offset:offset+size] += scale * x @ A[slot].T @ B[slot].T`` per row's slot."""
        whole = self.offset == 0 and self.size == y.shape[1]
        y_cols = y if whole else y.narrow(1, self.offset, self.size)
        for rows, a, b in self.direct:
            if rows is None:
                y_cols.addmm_(torch.mm(x, a), b, alpha=self.scale)
            else:
                y_cols[rows].addmm_(torch.mm(x[rows], a), b, alpha=self.scale)
        if self.packed is None:
            return
        rows, a, b, mask = self.packed
        h = torch.mm(x if rows is None else x[rows], a)
        h.mul_(mask)
        if rows is None:
            y_cols.addmm_(h, b)
        elif isinstance(rows, slice):
            y_cols[rows].addmm_(h, b)
        else:  # gathered, added and put back: rounded once, like the paths above
            y_cols[rows] = y_cols[rows].addmm_(h, b)


@dataclass(frozen=True)
class SliceWeights:
    """The weight views of one slice for the plans of one layout (``LoraPlan.layout``),
    looked up once: the plans of a new step over the same adapters share them (``bind``)."""

    dtype: torch.dtype
    offset: int
    size: int
    scale: float
    rank: int
    direct: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    """(A view ``(in, rank)``, B view ``(rank, size)``) per direct segment."""
    packed: tuple[torch.Tensor, torch.Tensor] | None
    """(A block, B block) of the packed group."""

    def bind(self, plan: LoraPlan) -> PreparedSlice:
        """These views with ``plan``'s rows (``plan`` has the layout they were looked up for)."""
        direct_rows, packed_rows = plan.row_views
        direct = tuple((rows, a, b) for rows, (a, b) in zip(direct_rows, self.direct, strict=True))
        packed = None
        if self.packed is not None:
            mask = plan.packed.mask(self.rank, self.dtype, self.scale)
            packed = (packed_rows, *self.packed, mask)
        return PreparedSlice(
            self.dtype, plan.num_tokens, self.offset, self.size, self.scale, direct, packed
        )


def prepare(
    plan: LoraPlan,
    y_width: int,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    offset: int,
    size: int,
    weights: LoraWeights,
    rank: int | None = None,
    slot_views: SlotViews | None = None,
) -> SliceWeights | None:
    """``lora_linear``'s weights for plans of ``plan``'s layout, their views resolved; None
    where the weights are prepacked or A and B differ in dtype (``lora_linear`` handles those).

    ``rank``: multiply by each slot's first ``rank`` rows of A (and columns of B) only;
    every row beyond must be zero in every slot (``layer_jobs.LiveSlice.rank``). All when None.
    ``slot_views``: the caller's cache of one slot's views of these two tensors (a dict lookup,
    where ``weights.block`` builds a key from the tensor's address)."""
    if weights.packs(lora_a) or lora_a.dtype != lora_b.dtype:
        return None
    rank = rank or lora_a.shape[-2]
    size = min(size, lora_b.shape[-2], y_width - offset)
    direct_slots, packed_slots = plan.layout
    direct = tuple(
        _slot_views(weights, lora_a, lora_b, slot, size, rank, slot_views) for slot in direct_slots
    )
    packed = None
    if packed_slots is not None:
        lo, span = packed_slots
        packed = (
            weights.block(lora_a, False, lo, span, size, rank),
            weights.block(lora_b, True, lo, span, size, rank),
        )
    return SliceWeights(lora_a.dtype, offset, size, scale, rank, direct, packed)


def _slot_views(
    weights: LoraWeights,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slot: int,
    size: int,
    rank: int,
    cache: SlotViews | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One slot's A view ``(in, rank)`` and B view ``(rank, size)``, from ``cache`` if there."""
    key = (slot, size, rank)
    views = None if cache is None else cache.get(key)
    if views is None:
        views = (
            weights.block(lora_a, False, slot, 1, size, rank),
            weights.block(lora_b, True, slot, 1, size, rank),
        )
        if cache is not None:
            cache[key] = views
    return views


def lora_linear(
    plan: LoraPlan,
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    offset: int,
    size: int,
    weights: LoraWeights,
) -> None:
    """``y[:, offset:offset+size] += scale * x @ A[slot].T @ B[slot].T`` for each row's slot."""
    views = prepare(plan, y.shape[1], lora_a, lora_b, scale, offset, size, weights)
    prepared = None if views is None else views.bind(plan)
    if prepared is not None and prepared.accepts(y, x):
        prepared.run(y, x)
        return
    rank = lora_a.shape[-2]
    size = min(size, lora_b.shape[-2], y.shape[1] - offset)
    y_cols = y.narrow(1, offset, size)
    for slot, start, stop in plan.direct:
        h = weights.matmul(x[start:stop], lora_a, False, slot, 1, size)
        weights.add_matmul(y_cols[start:stop], h, lora_b, True, slot, 1, size, scale)
    packed = plan.packed
    if packed is None:
        return
    lo, span = packed.lo, packed.span
    h = weights.matmul(x[packed.rows], lora_a, False, lo, span, size)
    h.mul_(packed.mask(rank, h.dtype, scale))
    if isinstance(packed.rows, slice):
        weights.add_matmul(y_cols[packed.rows], h, lora_b, True, lo, span, size)
    else:
        delta = weights.matmul(h, lora_b, True, lo, span, size)
        y_cols.index_add_(0, packed.rows, delta.to(y.dtype))


def shrink(
    plan: LoraPlan, out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, scale: float
) -> None:
    """``out[row, :rank] = scale * x[row] @ A[slot].T``; rows without a slot get 0."""
    a3 = slots(lora_a)
    rank = a3.shape[1]
    if not plan.covers_all:
        out.zero_()
    for slot, start, stop in plan.direct:
        h = x[start:stop].to(a3.dtype) @ a3[slot].t()
        out[start:stop, :rank] = h * scale
    packed = plan.packed
    if packed is None:
        return
    lo, span = packed.lo, packed.span
    h = x[packed.rows].to(a3.dtype) @ a3[lo : lo + span].reshape(span * rank, -1).t()
    h = (h * packed.mask(rank, h.dtype, scale)).view(-1, span, rank).sum(dim=1)
    out[packed.rows, :rank] = h.to(out.dtype)


def expand(
    plan: LoraPlan,
    y: torch.Tensor,
    h: torch.Tensor,
    lora_b: torch.Tensor,
    offset: int,
    size: int,
    add_inputs: bool,
) -> None:
    """``y[row, offset:offset+size] (+)= h[row] @ B[slot].T``; rows without a slot get 0."""
    b3 = slots(lora_b)
    rank = b3.shape[2]
    size = min(size, b3.shape[1], y.shape[1] - offset)
    y_cols = y.narrow(1, offset, size)
    if not add_inputs:
        y_cols.zero_()
    h = h[:, :rank].to(b3.dtype)
    for slot, start, stop in plan.direct:
        add_cast(y_cols[start:stop], h[start:stop] @ b3[slot, :size].t())
    packed = plan.packed
    if packed is None:
        return
    lo, span = packed.lo, packed.span
    wide = h[packed.rows].repeat(1, span) * packed.mask(rank, h.dtype, 1.0)
    b_block = b3[lo : lo + span, :size].transpose(1, 2).reshape(span * rank, size)
    delta = wide @ b_block
    if isinstance(packed.rows, slice):
        add_cast(y_cols[packed.rows], delta)
    else:
        y_cols.index_add_(0, packed.rows, delta.to(y.dtype))
