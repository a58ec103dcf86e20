"""Random PEFT-format LoRA adapters shaped by a ``BaseDims``, from numpy alone (no torch).

For fast tests of the registry against tiny fake bases and for synthetic load; adapters
built by PEFT itself on a real base model come from ``loraplex.synthetic``. ``lora_B`` is
non-zero so every adapter differs. Not a trainer.
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
    save_file(
        {k: v.astype(np.float32) for k, v in tensors.items()},
        folder / "adapter_model.safetensors",
        metadata={"format": "pt"},
    )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if manifest is not None:
        (folder / "loraplex.json").write_text(json.dumps(manifest))
    return folder
