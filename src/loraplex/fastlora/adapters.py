"""Random PEFT LoRA adapters on a base model, for fast-LoRA tests and benchmarks.

This makes throwaway adapters with nonzero weights (so they change the output) in PEFT's
on-disk format. It is not a training path and not the registry: nothing here validates or
versions adapters.
"""

from __future__ import annotations

from pathlib import Path

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_random_adapters(
    base_dir: str | Path,
    out_dir: str | Path,
    count: int,
    rank: int = 16,
    seed: int = 0,
    std: float = 0.02,
    target_modules: tuple[str, ...] = ALL_LINEAR,
) -> list[Path]:
    """Save ``count`` random LoRA adapters for ``base_dir`` under ``out_dir``/a0, a1, ...

    Both lora_A and lora_B get random normal values with standard deviation ``std``
    (PEFT initialises lora_B to zero, which would make every adapter a no-op).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), lora_dropout=0.0
    )
    model = get_peft_model(base, config)
    paths = []
    out = Path(out_dir)
    for i in range(count):
        generator = torch.Generator().manual_seed(seed * 1000 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
        path = out / f"a{i}"
        model.save_pretrained(str(path))
        paths.append(path)
    return paths
