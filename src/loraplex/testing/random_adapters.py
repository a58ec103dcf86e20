"""Random LoRA adapters in PEFT's on-disk format, for tests and benchmarks (never for users).

Two makers:
- ``make_random_adapters``: PEFT itself on a real base model folder (needs torch, transformers
  and peft); for anything that loads the adapter into an engine or compares outputs.
- ``write_random_adapter``: numpy alone, shaped by a ``BaseDims``; for fast registry tests
  against tiny fake bases that have no weights.

PEFT initialises ``lora_B`` to zero, which would make an adapter identical to the base; both
makers draw ``lora_A`` and ``lora_B`` from a normal distribution instead, so every adapter
changes the output. Not a trainer, and nothing here validates or versions adapters.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loraplex.adapters import CONFIG_FILE, LINEAR_PROJECTIONS, MANIFEST_FILE, WEIGHTS_FILE
from loraplex.registry.basedims import BaseDims

DEFAULT_TARGETS = ("q_proj", "v_proj")


def make_random_adapters(
    base_dir: Path,
    folders: Sequence[Path],
    *,
    seed: int = 0,
    rank: int = 8,
    targets: Sequence[str] = LINEAR_PROJECTIONS,
    std: float = 0.02,
    dtype: str = "float32",
    skip_existing: bool = False,
) -> list[Path]:
    """Save one random adapter for the model in ``base_dir`` into each of ``folders``.

    Every ``lora_A`` and ``lora_B`` value is drawn from N(0, ``std``); ``lora_alpha`` is
    ``2 * rank``. The adapter at position ``i`` uses generator seed ``seed * 100_003 + i``,
    so the same call makes the same adapters. ``dtype`` is the dtype of the saved tensors
    (a torch dtype name, e.g. ``"bfloat16"``). With ``skip_existing``, a folder that already
    holds weights is left as it is. Returns ``folders`` as paths.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = [Path(folder) for folder in folders]
    todo = [
        (i, path)
        for i, path in enumerate(paths)
        if not (skip_existing and (path / WEIGHTS_FILE).is_file())
    ]
    if not todo:
        return paths
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(targets),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    lora_params = [p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
    save_dtype = getattr(torch, dtype)
    for i, path in todo:
        generator = torch.Generator().manual_seed(seed * 100_003 + i)
        with torch.no_grad():
            for param in lora_params:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
        model.save_pretrained(str(path))
        if save_dtype != torch.float32:
            _cast_weights(path / WEIGHTS_FILE, save_dtype)
    return paths


def _cast_weights(file: Path, dtype: Any) -> None:
    """Rewrite a safetensors file with every tensor in ``dtype``."""
    from safetensors.torch import load_file, save_file

    tensors = {k: v.to(dtype).contiguous() for k, v in load_file(file).items()}
    save_file(tensors, file, metadata={"format": "pt"})


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
    """Write ``adapter_config.json`` + float32 ``adapter_model.safetensors`` to ``folder``.

    Needs no base weights: the shapes come from ``dims``. ``manifest``, if given, is written
    as ``loraplex.json``.
    """
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
        folder / WEIGHTS_FILE,
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
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if manifest is not None:
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return folder
