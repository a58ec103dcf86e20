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

import torch

from loraplex.fastlora.plan import LoraPlan
from loraplex.fastlora.weights import LoraWeights, add_cast, slots


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
