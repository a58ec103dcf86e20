"""Padding-free packing: several encoded examples per row, attention kept inside each example.

``pack`` places examples into rows of at most ``row_len`` tokens (best fit, longest first,
so rows come out nearly full and the order is deterministic). A row is the examples'
``input_ids`` and ``labels`` one after another, plus ``position_ids`` that restart at 0 for
each example. transformers reads restarting position ids (with no attention mask) as packed
sequences and masks attention block-diagonally, so no token sees another example, and RoPE
positions are what the example alone would get. The first label of every example is
masked, so no loss crosses a boundary: per-example losses equal unpacked training.
``should_pack`` and ``packed_attention`` are the auto rules. Pure list work: no torch.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from loraplex.train.encode import IGNORE_INDEX, Encoded

AUTO_MIN_GAIN = 1.25  # auto packs when it cuts the rows (steps of work) by at least this


def pack(items: Sequence[Encoded], row_len: int) -> list[dict[str, list[int]]]:
    """Rows of whole examples, each at most ``row_len`` tokens (best fit decreasing)."""
    order = sorted(range(len(items)), key=lambda i: (-len(items[i].input_ids), i))
    rows: list[list[int]] = []  # example indexes per row
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for index in order:
        size = len(items[index].input_ids)
        if size > row_len:
            raise ValueError(f"example of {size} tokens does not fit a row of {row_len}")
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            room, row = free.pop(slot)
        else:
            room, row = row_len, len(rows)
            rows.append([])
        rows[row].append(index)
        if room - size > 0:
            bisect.insort(free, (room - size, row))
    return [_row([items[i] for i in members]) for members in rows]


def _row(members: Sequence[Encoded]) -> dict[str, list[int]]:
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for item in members:
        row["input_ids"] += item.input_ids
        row["labels"] += [IGNORE_INDEX, *item.labels[1:]]
        row["position_ids"] += range(len(item.input_ids))
    return row


def should_pack(requested: bool | None, device: str, examples: int, rows: int) -> bool:
    """``--packing``/``--no-packing`` as given; auto: on CUDA when rows shrink enough."""
    if requested is not None:
        return requested
    return device == "cuda" and examples >= AUTO_MIN_GAIN * rows


def packed_attention(requested: str, device: str, has_varlen: bool) -> str:
    """Attention for packed rows, as given; auto: FlashAttention varlen on CUDA where torch
    has it (``loraplex.train.varlen``; as fast as or faster than flex in bench/README.md),
    else a flex ``BlockMask`` on CUDA, else transformers' own packed-sequence mask ("sdpa")."""
    if requested != "auto":
        return requested
    if device != "cuda":
        return "sdpa"
    return "varlen" if has_varlen else "flex"
