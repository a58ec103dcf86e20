"""Fused GPU kernels for training, from Liger Kernel (optional; Triton, CUDA only).

``apply`` swaps a Llama-family decoder's RMSNorm and SwiGLU MLP for Liger's fused Triton
versions (same function, fewer passes over memory) on that model only (Liger's own class
swap in transformers is undone); Liger's RoPE patch is a global function swap, so it is
left off. Compiled decoder layers (``loraplex.train.compiling``) do without these two.
``keep_lora_input_dtype`` tells PEFT's LoRA layers to keep their input in the compute dtype
under autocast instead of copying every activation to fp32 for the adapter branch.
``fused_answer_loss`` is Liger's fused linear + cross-entropy: it never materialises the
logits of all answer positions, which for a 128k vocabulary dominate a step's memory.
Without CUDA or without the ``liger-kernel`` package nothing changes (``available`` says
which); the plain path stays the reference.
"""

from __future__ import annotations

import importlib.util
from typing import Any

LIGER_MODELS = {"llama": "apply_liger_kernel_to_llama", "mistral": "apply_liger_kernel_to_mistral",
                "qwen2": "apply_liger_kernel_to_qwen2", "qwen3": "apply_liger_kernel_to_qwen3",
                "phi3": "apply_liger_kernel_to_phi3"}  # fmt: skip


def available(device: str, model_type: str) -> bool:
    """True where Liger's kernels can run: CUDA, a supported decoder, the package installed."""
    return (
        device == "cuda"
        and model_type in LIGER_MODELS
        and importlib.util.find_spec("liger_kernel") is not None
    )


def apply(model: Any) -> None:
    """Patch ``model`` (the base ``PreTrainedModel``, before or after PEFT) in place.

    Liger also swaps the RMSNorm and MLP classes of the transformers modeling module, so
    every model built later in the process would get its kernels too (a "plain" reference
    loop, compiled layers); those module attributes are put back, leaving ``model`` alone
    patched."""
    import importlib

    from liger_kernel import transformers as liger

    kind = model.config.model_type
    modeling = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    saved = dict(vars(modeling))
    patch = getattr(liger, LIGER_MODELS[kind])
    try:
        patch(rope=False, rms_norm=True, swiglu=True, cross_entropy=False,
              fused_linear_cross_entropy=False, model=model)  # fmt: skip
    finally:
        for name, value in saved.items():
            if vars(modeling).get(name) is not value:
                setattr(modeling, name, value)


def keep_lora_input_dtype(model: Any) -> None:
    """LoRA layers stop copying their input to the adapter's fp32 dtype (autocast casts)."""
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False


def fused_answer_loss(head: Any, hidden: Any, targets: Any) -> Any:
    """Sum of cross-entropy of ``head(hidden)`` against ``targets``, logits never stored."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return loss(head.weight, hidden, targets, getattr(head, "bias", None))
