"""LoRA weights in the layouts the fast ops want, cached until vLLM writes new weights.

- ``block``: a block of several slots of B (and of A, when cut to a rank) is a view of a
  contiguous copy of every slot, B transposed to ``(slots, rank, out)`` so that the block
  is one ``(span*rank, out)`` matrix (vLLM stores B as ``(slots, 1, out, rank)``). A load
  copies again only the slot it wrote.
- ``block(..., rank)``: only the first ``rank`` rows of each slot's A and columns of its B.
  vLLM sizes every slot for ``max_lora_rank`` (64 by default) and pads a lower-rank adapter
  with zeros; multiplying by the padding costs the bytes and FLOPs of the full rank (3x the
  LoRA time of rank-8 adapters at the default, measured in-engine).
- ``matmul``: ``x @ W`` for a slot or a block of slots of A or B. In bf16/fp16 through vLLM's
  oneDNN GEMM with the weight prepacked once (what vLLM does for its own linear layers): small
  LoRA GEMMs through ``torch.matmul`` in bf16 cost ~2x more. In float32 through
  ``torch.matmul`` (MKL's sgemm is as fast there, and a load then packs nothing), and where
  vLLM's oneDNN op is missing, cannot multiply bf16 on this CPU (no AVX-512: vLLM's own
  layers fall back to ``torch`` there too) or the dtypes differ.

vLLM loads an adapter into a slot with in-place copies, which bump the version counter that
all views of the stacked tensor share, so a moved counter says that *some* slot changed, not
which. When ``slot_writes`` knows which slots were written (their LoRA id changed), a block
of other slots is kept as is. Otherwise, or for a block of a written slot, its current values
are compared with the copy it keeps of the values it was packed from (a few microseconds), and
only a block whose values changed is packed again (a pack costs a hundred times more).
Loading an adapter into one slot thus repacks that slot's blocks only, and none where the new
adapter leaves a module's LoRA at zero as the old one did. A block that is all zero (a module
the adapter does not target) is not packed at all: its product is zero.
This module does not decide which rows use which slot (``plan``) nor add into outputs (``ops``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from loraplex.fastlora.slot_writes import SlotWrites, Stamp

#: Prepacked matrices kept per stacked tensor (direct slots + packed blocks); cleared beyond.
MAX_PACKED_PER_TENSOR = 48

#: Dtypes whose LoRA GEMMs are prepacked. float32 is not: MKL's sgemm through torch.matmul is
#: as fast or faster at LoRA shapes (decode rows: 3-4 us vs 13-15 us), and a pack costs
#: ~0.3 ms, 120 of them per rank-16 q/v adapter load.
PACKED_DTYPES = (torch.bfloat16, torch.float16)


def slots(stacked: torch.Tensor) -> torch.Tensor:
    """(slots, 1, a, b) or (slots, a, b) -> (slots, a, b), a view."""
    return stacked[:, 0] if stacked.dim() == 4 else stacked


def add_cast(target: torch.Tensor, delta: torch.Tensor) -> None:
    """``target += delta``, ``delta`` cast to ``target``'s dtype where they differ."""
    target.add_(delta if delta.dtype == target.dtype else delta.to(target.dtype))


@functools.cache
def _onednn() -> Any | None:
    """vLLM's oneDNN ops where they can pack a bf16 weight on this CPU, else None."""
    try:
        from vllm import _custom_ops
    except ImportError:
        return None
    if not getattr(_custom_ops, "_supports_onednn", False):
        return None
    try:
        _custom_ops.create_onednn_mm(torch.ones(16, 16, dtype=torch.bfloat16), 32)
    except RuntimeError:  # "could not create a primitive descriptor": an AVX2-only CPU
        return None
    return _custom_ops


class RowsCopy(NamedTuple):
    """``LoraWeights._copy``'s entry: a stacked tensor's first ``rank`` rows, copied."""

    version: int
    """The stacked tensor's version when ``copy`` was last brought up to date."""
    rank: int
    stacked: torch.Tensor
    copy: torch.Tensor
    stamp: Stamp
    """``SlotWrites.stamp`` at that version."""


@dataclass
class PackedBlock:
    """One block of slots prepacked for oneDNN, and the values it was packed from."""

    source: torch.Tensor
    """The ``(K, N)`` weight as packed (a private copy, compared bit for bit)."""
    handler: Any | None
    """The oneDNN handle; None when the block is all zero (nothing to multiply)."""
    version: int
    """The stacked tensor's version at which ``source`` was last seen equal to it."""
    stamp: Stamp
    """``SlotWrites.stamp`` at that version."""


class LoraWeights:
    """Per-engine caches of LoRA weights in fast layouts (one per punica wrapper)."""

    def __init__(self, use_onednn: bool = True, writes: SlotWrites | None = None) -> None:
        self._onednn = _onednn() if use_onednn else None
        self._writes = writes or SlotWrites()
        self._copies: dict[tuple[int, bool], RowsCopy] = {}
        self._views: dict[tuple[int, bool, int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._packed: dict[int, tuple[torch.Tensor, dict[tuple, PackedBlock]]] = {}

    @property
    def uses_onednn(self) -> bool:
        return self._onednn is not None

    def packs(self, stacked: torch.Tensor) -> bool:
        """Whether ``stacked``'s blocks go through prepacked oneDNN (else ``torch.matmul``)."""
        return self._onednn is not None and stacked.dtype in PACKED_DTYPES

    def _copy(self, stacked: torch.Tensor, is_b: bool, rank: int) -> torch.Tensor:
        """Every slot's first ``rank`` rows of A (``(slots, rank, in)``) or columns of B
        (``(slots, rank, out)``, transposed), contiguous. After vLLM writes ``stacked``, only
        the slots ``slot_writes`` says were written are copied again, into the same tensor
        (every slot when it does not know): a load into one of 8 slots copies one."""
        key = (stacked.data_ptr(), is_b)
        hit = self._copies.get(key)
        version = stacked._version
        written = None
        if hit is not None and hit.stacked is stacked and hit.rank == rank:
            if hit.version == version:
                return hit.copy
            written = self._writes.changed(hit.stamp, stacked.shape[0])
        s3 = slots(stacked)
        if written is None:
            copy = (s3[:, :, :rank].transpose(1, 2) if is_b else s3[:, :rank]).contiguous()
        else:
            copy = hit.copy
            for slot in written:
                copy[slot] = s3[slot, :, :rank].t() if is_b else s3[slot, :rank]
        self._copies[key] = RowsCopy(version, rank, stacked, copy, self._writes.stamp)
        return copy

    def block(
        self,
        stacked: torch.Tensor,
        is_b: bool,
        lo: int,
        span: int,
        size: int,
        rank: int | None = None,
    ) -> torch.Tensor:
        """Slots ``lo .. lo+span-1`` as the right-hand ``(K, N)`` matrix of ``x @ W``.

        A gives ``(in, span*rank)``, B gives ``(span*rank, size)``. ``rank``: only each
        slot's first ``rank`` rows of A and columns of B (the rest must be zero: vLLM pads
        an adapter of a lower rank than ``max_lora_rank`` with zeros); all when None. One
        slot's views of ``stacked`` (which vLLM writes in place) are cached: at most one
        per slot, size and rank. A block of several slots is a view of a copy (``_copy``)
        where the rows it needs are not contiguous in ``stacked``.
        """
        full = stacked.shape[-1] if is_b else stacked.shape[-2]
        rank = rank or full
        if span > 1:
            if is_b:
                block = self._copy(stacked, True, rank)[lo : lo + span, :, :size]
                return block.reshape(span * rank, size)
            a3 = slots(stacked) if rank == full else self._copy(stacked, False, rank)
            return a3[lo : lo + span, :rank].reshape(span * rank, a3.shape[2]).t()
        key = (stacked.data_ptr(), is_b, lo, size, rank)
        hit = self._views.get(key)
        if hit is not None and hit[0] is stacked:
            return hit[1]
        # views: no transpose of every slot
        s3 = slots(stacked)
        view = s3[lo, :size, :rank].t() if is_b else s3[lo, :rank].t()
        self._views[key] = (stacked, view)
        return view

    def matmul(
        self, x: torch.Tensor, stacked: torch.Tensor, is_b: bool, lo: int, span: int, size: int
    ) -> torch.Tensor:
        """``x @ block(...)``, prepacked through oneDNN when possible."""
        if not self.packs(stacked) or x.dtype != stacked.dtype:
            return torch.mm(x, self.block(stacked, is_b, lo, span, size).to(x.dtype))
        packed = self.packed(stacked, is_b, lo, span, size)
        if packed.handler is None:
            return x.new_zeros(x.shape[0], packed.source.shape[1])
        return self._onednn.onednn_mm(packed.handler, x.contiguous(), None)

    def add_matmul(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        stacked: torch.Tensor,
        is_b: bool,
        lo: int,
        span: int,
        size: int,
        alpha: float = 1.0,
    ) -> None:
        """``y += alpha * x @ block(...)``: one fused ``addmm_`` where nothing is prepacked
        and the dtypes agree (decode steps are dominated by per-op overhead), else
        ``matmul`` and an add."""
        if not self.packs(stacked) and x.dtype == stacked.dtype == y.dtype:
            y.addmm_(x, self.block(stacked, is_b, lo, span, size), alpha=alpha)
            return
        delta = self.matmul(x, stacked, is_b, lo, span, size)
        if alpha != 1.0:
            delta.mul_(alpha)
        add_cast(y, delta)

    def refresh(self, lora_a: torch.Tensor, lora_b: torch.Tensor, slot: int, size: int) -> None:
        """Pack ``slot``'s A and B of one slice now, as its first ``matmul`` (``size``
        output columns) would; nothing without oneDNN or in float32."""
        if self.packs(lora_a):
            self.packed(lora_a, False, slot, 1, size)
            self.packed(lora_b, True, slot, 1, size)

    def packed(
        self, stacked: torch.Tensor, is_b: bool, lo: int, span: int, size: int
    ) -> PackedBlock:
        """The block prepacked, packed again only if its values changed since."""
        entry = self._packed.get(stacked.data_ptr())
        if entry is None or entry[0] is not stacked:
            entry = (stacked, {})
            self._packed[stacked.data_ptr()] = entry
        blocks = entry[1]
        key = (is_b, lo, span, size)
        cached = blocks.get(key)
        version = stacked._version
        if cached is not None and cached.version == version:
            return cached
        stamp = self._writes.stamp
        if cached is not None:
            written = self._writes.changed(cached.stamp, stacked.shape[0])
            if written is not None and not any(lo <= slot < lo + span for slot in written):
                cached.version, cached.stamp = version, stamp  # other slots were written
                return cached
        weight = _block_copy(stacked, is_b, lo, span, size)
        if cached is not None and _same_bits(weight, cached.source):
            cached.version, cached.stamp = version, stamp
            return cached
        if len(blocks) >= MAX_PACKED_PER_TENSOR:
            blocks.clear()
        handler = self._onednn.create_onednn_mm(weight, 32) if bool(weight.any()) else None
        blocks[key] = PackedBlock(weight, handler, version, stamp)
        return blocks[key]


def _block_copy(stacked: torch.Tensor, is_b: bool, lo: int, span: int, size: int) -> torch.Tensor:
    """``LoraWeights.block`` as a new contiguous tensor, read from these slots only (not
    through ``_copy``, which would transpose every slot of B after each load)."""
    s3 = slots(stacked)[lo : lo + span]
    if is_b:
        block = s3[:, :size].transpose(1, 2).reshape(span * s3.shape[2], size)
    else:
        block = s3.reshape(span * s3.shape[1], s3.shape[2]).t()
    return block.clone(memory_format=torch.contiguous_format)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two contiguous tensors (-0.0 and 0.0 differ, NaN equals itself)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
