"""torch.compile of the decoder layers ("regional" compilation), for training on CUDA.

Each decoder layer is compiled on its own (``Module.compile``): the layers share one code
path, so inductor compiles one forward and one backward graph for all of them rather than
one unrolled graph of the whole model (the H200 runs made 2 graphs for 30 and 32 layers).
Inside a layer it fuses RMSNorm, RoPE, SwiGLU, the LoRA branches' dropout, scale and add
into few kernels, which cuts the kernel launches that bound small models (1.29x on the 135M
shape; peak memory unchanged). Liger's per-layer kernels are then left off
(``loraplex.train.kernels``), its fused linear + cross-entropy stays: the loss runs outside
the layers. Shapes are compiled as they come (first static, a new shape once dynamic), so
packed rows of one width and fixed batches compile once. Auto: on for CUDA without gradient
checkpointing (``loraplex.train.runtime.use_compile``), off on CPU.
"""

from __future__ import annotations

from typing import Any


def should_compile(requested: bool | None, device: str) -> bool:
    """``--compile``/``--no-compile`` as given; auto: on CUDA only."""
    return requested if requested is not None else device == "cuda"


def decoder_layers(model: Any) -> list[Any]:
    """The repeated decoder layers of a (PEFT-wrapped) causal LM; empty if it has none."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(causal.get_decoder(), "layers", None)
    return list(layers) if layers is not None else []


def compile_layers(model: Any) -> int:
    """Compile every decoder layer of ``model`` in place (traced on first use); how many."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)
