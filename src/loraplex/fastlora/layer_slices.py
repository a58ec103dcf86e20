"""The stacked LoRA slices of one of vLLM's LoRA layers, as the fast-LoRA ops compute them."""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.layers import LogitsProcessorWithLoRA


def lora_slices(layer: Any) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(A, B, output columns) of each slice of ``layer`` that the ops compute, with the
    columns ``ops.lora_linear`` uses: a linear layer's slices (``add_lora_linear``), the
    lm_head's one (``add_lora_logits``); none for others (an embedding reads no cache)."""
    if isinstance(layer, LogitsProcessorWithLoRA):
        return [(layer.lora_a_stacked, layer.lora_b_stacked, layer.lora_b_stacked.shape[-2])]
    sizes = getattr(layer, "output_slices", None)
    if sizes is None:
        return []
    return [
        (lora_a, lora_b, min(size, lora_b.shape[-2]))
        for lora_a, lora_b, size in zip(
            layer.lora_a_stacked, layer.lora_b_stacked, sizes, strict=True
        )
    ]
