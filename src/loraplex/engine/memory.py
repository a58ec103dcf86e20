"""The host memory a server's settings plan to use, checked against a budget before it starts.

A server that could outgrow its machine fails late and takes every tenant down (the kernel's
OOM killer does not pick the broken adapter). ``check_memory`` adds up what the settings
commit: base weights, KV cache and LoRA slots when the engine runs on CPU, and the adapter
cache (host memory on every device), and refuses a sum above ``memory_budget_gib`` (default:
physical memory) with the arithmetic in the message. It reads headers and config only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from loraplex.basemodel import bundled_model_dir
from loraplex.config import Settings, SettingsError
from loraplex.engine.adapter_fit import ITEMSIZE
from loraplex.registry.basedims import BaseDims
from loraplex.registry.tensorfile import read_header

GIB = 2**30
MIB = 2**20


def physical_memory() -> int:
    """Bytes of RAM of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def model_bytes(model_dir: Path, itemsize: int) -> int:
    """Bytes of the base model's weights in the engine dtype."""
    elements = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        elements += sum(math.prod(t.shape) for t in read_header(file).tensors.values())
    return elements * itemsize


def lora_slot_bytes(dims: BaseDims, rank: int, itemsize: int) -> int:
    """Bytes of one engine LoRA slot at ``rank`` over every projection of every layer."""
    per_layer = sum(i + o for i, o in dims.module_shapes().values()) * rank
    return per_layer * dims.num_hidden_layers * itemsize


def planned_bytes(
    settings: Settings, model_dir: Path, dtype: str, on_cpu: bool
) -> list[tuple[int, str]]:
    """(bytes, what) of each part of the plan."""
    itemsize = ITEMSIZE[dtype]
    parts = [
        (
            settings.adapter_cache_mb * MIB,
            f"adapter cache (--adapter-cache-mb {settings.adapter_cache_mb})",
        )
    ]
    if not on_cpu:
        return parts
    parts.append(
        (settings.kv_cache_gib * GIB, f"KV cache (--kv-cache-gib {settings.kv_cache_gib})")
    )
    if (model_dir / "config.json").is_file():
        dims = BaseDims.from_model_dir(model_dir)
        slot = lora_slot_bytes(dims, settings.max_lora_rank, itemsize)
        parts.append((model_bytes(model_dir, itemsize), f"base weights ({dtype})"))
        parts.append(
            (
                settings.max_loras * slot,
                f"LoRA slots (--max-loras {settings.max_loras} x rank {settings.max_lora_rank})",
            )
        )
    return parts


def check_memory(settings: Settings, dtype: str | None = None, on_cpu: bool | None = None) -> None:
    """Raise ``SettingsError`` with the arithmetic if the plan exceeds the memory budget.

    ``dtype`` and ``on_cpu`` default to what the engine will use on this machine.
    """
    if dtype is None or on_cpu is None:
        import torch

        from loraplex.engine.vllm_engine import resolve_dtype

        dtype = dtype or resolve_dtype(settings.dtype)
        on_cpu = not torch.cuda.is_available() if on_cpu is None else on_cpu
    model_dir = settings.base_model or bundled_model_dir(settings.models_dir)
    parts = planned_bytes(settings, model_dir, dtype, on_cpu)
    total = sum(n for n, _ in parts)
    if settings.memory_budget_gib is not None:
        budget, where = int(settings.memory_budget_gib * GIB), "--memory-budget-gib"
    else:
        budget, where = physical_memory(), "physical memory; --memory-budget-gib"
    if total <= budget:
        return
    terms = " + ".join(f"{n / GIB:.2f} GiB {what}" for n, what in parts)
    raise SettingsError(
        f"memory budget exceeded: these settings need {terms} = {total / GIB:.2f} GiB, more "
        f"than the memory budget {budget / GIB:.2f} GiB ({where}); lower one of them or "
        "raise the budget"
    )
