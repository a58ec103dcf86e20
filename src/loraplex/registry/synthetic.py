"""Random LoRA adapters shaped for a base model, for tests and benchmarks.

Two ways: ``write_random_adapter`` writes a PEFT-format folder from numpy alone (no torch),
shaped by a ``BaseDims``; ``peft_random_adapters`` builds real PEFT adapters on the base
model with ``get_peft_model`` + ``save_pretrained`` (needs the ``train`` extra). Both give
non-zero ``lora_B`` so that every adapter changes the output. Not a trainer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loraplex.registry.basedims import BaseDims

DEFAULT_TARGETS = ("q_proj", "v_proj")


def write_random_adapter(
    folder: Path,
    dims: BaseDims,
    *,
    rank: int = 4,
    alpha: float = 8,
    targets: Sequence[str] = DEFAULT_TARGETS,
    seed: int = 0,
    manifest: dict[str, Any] | None = None,
) -> Path:
    """Write ``adapter_config.json`` + float32 ``adapter_model.safetensors`` to ``folder``."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    shapes = dims.module_shapes()
    tensors = {}
    for path, short in dims.module_paths().items():
        if short not in targets:
            continue
        in_features, out_features = shapes[short]
        prefix = f"base_model.model.{path}"
        tensors[f"{prefix}.lora_A.weight"] = rng.normal(0, 0.02, (rank, in_features))
        tensors[f"{prefix}.lora_B.weight"] = rng.normal(0, 0.02, (out_features, rank))
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.astype(np.float32) for k, v in tensors.items()},
              folder / "adapter_model.safetensors", metadata={"format": "pt"})  # fmt: skip
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": list(targets), "bias": "none", "use_dora": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if manifest is not None:
        (folder / "loraplex.json").write_text(json.dumps(manifest))
    return folder


def peft_random_adapters(
    base_dir: Path,
    out_dir: Path,
    count: int,
    *,
    rank: int = 4,
    targets: Sequence[str] = DEFAULT_TARGETS,
    seed: int = 0,
) -> list[Path]:
    """``count`` PEFT adapters on the base model in ``base_dir``, each with its own weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                        task_type="CAUSAL_LM")  # fmt: skip
    peft_model = get_peft_model(model, config)
    folders = []
    for index in range(count):
        generator = torch.Generator().manual_seed(seed + index)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        folder = out_dir / f"adapter{index}"
        peft_model.save_pretrained(folder)
        folders.append(folder)
    return folders
