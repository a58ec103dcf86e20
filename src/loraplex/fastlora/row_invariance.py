"""16-bit linear layers whose output rows do not depend on how many rows share the step.

vLLM's CPU linear layers run oneDNN's matmul (``dispatch_cpu_unquantized_gemm``). For some
shapes oneDNN computes a single row (a decode step of one sequence) with another kernel than
two rows or more, summing in another order; from two rows on, a row's bits are the same
whatever the row count. On the bundled model that is the down projection (K=1536): its rows
differ by a few units in the last place. In fp32 that never changed a greedy token in
``bench/batch_invariance.py``; in bf16 the rounding makes it visible, and 6 of 16 greedy
completions changed when their requests were batched with others (0 of 16 with this).

So in 16-bit dtypes every linear layer gets one zero row more: a step never has one row. The
padding does not branch on the row count, so a compiled graph keeps it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

Linear = Callable[[torch.Tensor, Any, Any], torch.Tensor]
PADDED_DTYPES = (torch.bfloat16, torch.float16)


def padded(linear: Linear) -> Linear:
    """``linear`` computed with one zero row appended to its input, that row dropped after."""

    def run(x: torch.Tensor, weight: Any, bias: Any) -> torch.Tensor:
        rows = torch.cat([x, x.new_zeros((1, *x.shape[1:]))])
        return linear(rows, weight, bias)[:-1]

    return run


def pad_16_bit_linears() -> None:
    """Wrap vLLM's CPU linear dispatch (once) so that 16-bit layers get ``padded``."""
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "_loraplex_padded", False):
        return

    @functools.wraps(original)
    def dispatch(layer: Any, remove_weight: bool) -> None:
        weight = layer.weight
        original(layer, remove_weight)
        linear = getattr(layer, "cpu_linear", None)
        if weight.ndim == 2 and weight.dtype in PADDED_DTYPES and linear is not None:
            layer.cpu_linear = padded(linear)

    dispatch._loraplex_padded = True  # type: ignore[attr-defined]
    utils.dispatch_cpu_unquantized_gemm = dispatch
