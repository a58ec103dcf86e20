"""Random LoRA adapters for a base model, for tests and benchmarks (never for serving users).

PEFT initialises ``lora_B`` to zero, which would make an adapter identical to the base; these
get small random non-zero weights so that each one measurably changes the output.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_adapter(
    base_dir: Path,
    out_dir: Path,
    seed: int,
    rank: int = 8,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    scale: float = 0.02,
) -> Path:
    """Write a PEFT adapter with random weights for ``base_dir`` into ``out_dir``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(targets), task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, scale)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir
