"""LoRA weights in the layouts the fast ops want, cached until vLLM writes new weights.

- ``b_t``: B as ``(slots, rank, out)`` so that a block of slots is one ``(span*rank, out)``
  matrix (vLLM stores ``(slots, 1, out, rank)``).
- ``matmul``: ``x @ W`` for a slot or a block of slots of A or B through vLLM's oneDNN GEMM
  with the weight prepacked once (what vLLM does for its own linear layers). Small LoRA GEMMs
  through ``torch.matmul`` in bf16 cost several times more. Falls back to ``torch.matmul``
  where vLLM's oneDNN op is missing or the dtypes differ.

A cached entry is remade when the stacked tensor's version counter moves: vLLM loads an
adapter into a slot with in-place copies, which bump the counter shared by all its views.
This module does not decide which rows use which slot (``plan``) nor add into outputs (``ops``).
"""

from __future__ import annotations

from typing import Any

import torch

#: Prepacked matrices kept per stacked tensor (direct slots + packed blocks); cleared beyond.
MAX_PACKED_PER_TENSOR = 48


def slots(stacked: torch.Tensor) -> torch.Tensor:
    """(slots, 1, a, b) or (slots, a, b) -> (slots, a, b), a view."""
    return stacked[:, 0] if stacked.dim() == 4 else stacked


def _onednn() -> Any | None:
    try:
        from vllm import _custom_ops
    except ImportError:
        return None
    return _custom_ops if getattr(_custom_ops, "_supports_onednn", False) else None


class LoraWeights:
    """Per-engine caches of LoRA weights in fast layouts (one per punica wrapper)."""

    def __init__(self, use_onednn: bool = True) -> None:
        self._onednn = _onednn() if use_onednn else None
        self._b_t: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self._packed: dict[int, tuple[int, torch.Tensor, dict[tuple, Any]]] = {}

    @property
    def uses_onednn(self) -> bool:
        return self._onednn is not None

    def b_t(self, stacked: torch.Tensor) -> torch.Tensor:
        """B of every slot as ``(slots, rank, out)``, contiguous."""
        hit = self._b_t.get(stacked.data_ptr())
        if hit is not None and hit[0] == stacked._version and hit[1] is stacked:
            return hit[2]
        transposed = slots(stacked).transpose(1, 2).contiguous()
        self._b_t[stacked.data_ptr()] = (stacked._version, stacked, transposed)
        return transposed

    def block(self, stacked: torch.Tensor, is_b: bool, lo: int, span: int, size: int):
        """Slots ``lo .. lo+span-1`` as the right-hand ``(K, N)`` matrix of ``x @ W``.

        A gives ``(in, span*rank)``, B gives ``(span*rank, size)``.
        """
        if is_b:
            rank = stacked.shape[-1]
            return self.b_t(stacked)[lo : lo + span, :, :size].reshape(span * rank, size)
        a3 = slots(stacked)
        return a3[lo : lo + span].reshape(span * a3.shape[1], a3.shape[2]).t()

    def matmul(
        self, x: torch.Tensor, stacked: torch.Tensor, is_b: bool, lo: int, span: int, size: int
    ) -> torch.Tensor:
        """``x @ block(...)``, prepacked through oneDNN when possible."""
        if self._onednn is None or x.dtype != stacked.dtype:
            weight = self.block(stacked, is_b, lo, span, size)
            return x @ weight.to(x.dtype)
        handler = self._handler(stacked, is_b, lo, span, size)
        return self._onednn.onednn_mm(handler, x.contiguous(), None)

    def _handler(self, stacked: torch.Tensor, is_b: bool, lo: int, span: int, size: int):
        entry = self._packed.get(stacked.data_ptr())
        if entry is None or entry[0] != stacked._version or entry[1] is not stacked:
            entry = (stacked._version, stacked, {})
            self._packed[stacked.data_ptr()] = entry
        handlers = entry[2]
        key = (is_b, lo, span, size)
        handler = handlers.get(key)
        if handler is None:
            if len(handlers) >= MAX_PACKED_PER_TENSOR:
                handlers.clear()
            weight = self.block(stacked, is_b, lo, span, size).contiguous()
            handler = self._onednn.create_onednn_mm(weight, 32)
            handlers[key] = handler
        return handler
