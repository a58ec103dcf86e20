"""Per-step plan for multi-LoRA on CPU: which tokens take which path.

vLLM gives the LoRA layers one slot index per token (-1: no adapter). Gathering a weight copy
per token (what vLLM's torch ops do) is what makes CPU LoRA slow, so a plan, built once per
forward step and reused by every layer, splits the tokens into:

- direct segments: runs of consecutive tokens with one adapter, long enough to pay for their
  own matmuls. They read the adapter's A and B in place (views, no copy).
- one packed group: the remaining short runs (decode tokens of different adapters, for
  example). They go through a single matmul against the contiguous block of slots they use
  (slots ``lo .. lo+span-1``), and a 0/1 mask keeps each token's own adapter only.

Tokens with slot -1 take neither path and get no delta. This module holds no weights and does
no math on activations; see ``ops`` for that.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

#: A run of at least this many tokens is computed on its own (two matmuls per slice);
#: shorter runs are packed together. Tuned on 2 CPU cores with SmolLM2-135M, rank 16.
LONG_SEGMENT = 16


@dataclass
class Packed:
    """Short runs computed together against slots ``lo .. lo + span - 1``."""

    rows: slice | torch.Tensor
    """Token rows of the group: a slice when they are one contiguous range, else an index."""
    lo: int
    span: int
    onehot: torch.Tensor
    """(rows, span) float mask: 1 where the row uses slot ``lo + j``; all 0 for slot -1."""
    _masks: dict[tuple[int, torch.dtype, float], torch.Tensor] = field(default_factory=dict)

    def mask(self, rank: int, dtype: torch.dtype, scale: float) -> torch.Tensor:
        """The one-hot mask widened to ``span * rank`` columns, times ``scale``."""
        key = (rank, dtype, scale)
        cached = self._masks.get(key)
        if cached is None:
            cached = (self.onehot * scale).to(dtype).repeat_interleave(rank, dim=1)
            self._masks[key] = cached
        return cached


@dataclass
class LoraPlan:
    """How one step's tokens are split between direct segments and the packed group."""

    num_tokens: int
    direct: list[tuple[int, int, int]]
    """(slot, start, stop) for each run computed on its own."""
    packed: Packed | None
    slots: tuple[int, ...] = ()
    """The distinct slots (>= 0) the step's tokens use, ascending."""
    indices: torch.Tensor | None = field(default=None, repr=False)
    """The slot of each token the plan was built from."""
    _subplans: dict[tuple[int, ...], LoraPlan] = field(default_factory=dict, repr=False)

    @property
    def empty(self) -> bool:
        """True when no token in the step uses an adapter."""
        return not self.direct and self.packed is None

    @functools.cached_property
    def layout(self) -> tuple[tuple[int, ...], tuple[int, int] | None]:
        """The slots the plan multiplies by and how: each direct segment's slot, and the
        packed group's ``(lo, span)``. Plans of one layout use the same weight views."""
        packed = None if self.packed is None else (self.packed.lo, self.packed.span)
        return tuple(slot for slot, _, _ in self.direct), packed

    @functools.cached_property
    def row_views(self) -> tuple[tuple[slice | None, ...], slice | torch.Tensor | None]:
        """The rows of each direct segment and of the packed group, None where they are every
        row (decode steps are dominated by per-op overhead: whole inputs are not sliced)."""

        def rows(start: int, stop: int) -> slice | None:
            return None if start == 0 and stop == self.num_tokens else slice(start, stop)

        direct = tuple(rows(start, stop) for _, start, stop in self.direct)
        packed = None if self.packed is None else self.packed.rows
        if isinstance(packed, slice):
            packed = rows(packed.start, packed.stop)
        return direct, packed

    @property
    def covers_all(self) -> bool:
        """True when every row is written by a direct segment or the packed group."""
        covered = sum(stop - start for _, start, stop in self.direct)
        if self.packed is not None:
            rows = self.packed.rows
            covered += rows.stop - rows.start if isinstance(rows, slice) else rows.numel()
        return covered == self.num_tokens

    def only(self, live: tuple[int, ...]) -> LoraPlan:
        """This plan with the tokens of slots outside ``live`` treated as base tokens.

        For a layer where some of the step's adapters have zero weights: their tokens need
        no delta there. Cached per ``live``; ``self`` when ``live`` is every slot in use.
        """
        if live == self.slots or self.indices is None:
            return self
        plan = self._subplans.get(live)
        if plan is None:
            keep = torch.isin(self.indices, torch.tensor(live, dtype=self.indices.dtype))
            plan = LoraPlan.build(torch.where(keep, self.indices, -1))
            self._subplans[live] = plan
        return plan

    @classmethod
    def build(cls, indices: torch.Tensor, long_segment: int = LONG_SEGMENT) -> LoraPlan:
        """Plan for ``indices``: one slot per token, -1 for no adapter (1-D, long)."""
        num_tokens = int(indices.numel())
        if num_tokens == 0:
            return cls(0, [], None)
        slots_t, counts_t = torch.unique_consecutive(indices, return_counts=True)
        runs: list[tuple[int, int, int]] = []
        start = 0
        for slot, count in zip(slots_t.tolist(), counts_t.tolist(), strict=True):
            if slot >= 0:
                runs.append((slot, start, start + count))
            start += count
        slots = tuple(sorted({slot for slot, _, _ in runs}))
        direct = [run for run in runs if run[2] - run[1] >= long_segment]
        short = [run for run in runs if run[2] - run[1] < long_segment]
        if len(short) == 1:
            direct.append(short[0])
            short = []
        if not short:
            return cls(num_tokens, direct, None, slots, indices)
        return cls(num_tokens, direct, _pack(indices, short, direct), slots, indices)


def _pack(
    indices: torch.Tensor, short: list[tuple[int, int, int]], direct: list[tuple[int, int, int]]
) -> Packed:
    first, last = short[0][1], short[-1][2]
    if any(first <= start < last for _, start, _ in direct):
        rows: slice | torch.Tensor = torch.cat(
            [torch.arange(start, stop) for _, start, stop in short]
        )
        local = indices[rows]
    else:
        rows = slice(first, last)
        local = indices[first:last]
    slots = [slot for slot, _, _ in short]
    lo = min(slots)
    span = max(slots) - lo + 1
    onehot = torch.zeros(local.numel(), span, dtype=torch.float32)
    used = (local >= 0).nonzero().squeeze(1)
    onehot[used, local[used] - lo] = 1.0
    return Packed(rows, lo, span, onehot)
