"""vLLM's read of an adapter's files, with less work per tensor (a general-plugin patch).

A cold load spends most of its engine time in ``LoRAModel.from_local_checkpoint``. It opens
``adapter_model.safetensors`` with ``safetensors.safe_open`` and fetches each tensor by name
(a rank-16 q/v adapter of the bundled model has 120), and it parses every tensor name two or
three times (``parse_fine_tuned_lora_name``; every adapter of a model has the same names).
Here the file is read and split in one call (``safetensors.torch.load``) and the parse of a
name is cached. vLLM's code around both is unchanged, so it builds the same ``LoRAModel``,
tensor for tensor (``tests/unit/test_adapter_read.py``). In vLLM's CPU worker, for that
adapter, a read takes 0.63-0.67x the time (``python -m bench.adapter_read``).

The whole file is in memory while it is split (twice its size at the peak, where ``safe_open``
maps it): adapters are megabytes. Each tensor owns its own copy of its bytes, which vLLM may
scale in place, as it does ``safe_open``'s. Written against vLLM 0.32.0 (pinned).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import safetensors.torch
import torch

#: Names cached (tensor names of adapters for one base model: 4 per adapted module).
MAX_NAMES = 16_384


class WholeFile:
    """``safetensors.safe_open``'s interface, as vLLM's adapter read uses it, over a file read
    and split in one call."""

    def __init__(self, path: str, framework: str = "pt", device: str = "cpu") -> None:
        self._tensors = safetensors.torch.load(Path(path).read_bytes())

    def __enter__(self) -> WholeFile:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def keys(self) -> list[str]:
        """The tensor names, sorted as ``safe_open`` gives them."""
        return sorted(self._tensors)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def cached_parse(parse: Callable[..., tuple[str, bool]]) -> Callable[..., tuple[str, bool]]:
    """``parse_fine_tuned_lora_name`` remembered per name where no weights mapper renames
    (none is given, or an empty one: vLLM passes the model's renames only, and most models,
    Llama among them, have none)."""
    from vllm.model_executor.models.utils import WeightsMapper

    renames_nothing = WeightsMapper()
    remembered = functools.lru_cache(maxsize=MAX_NAMES)(parse)

    @functools.wraps(parse)
    def run(name: str, weights_mapper: Any = None) -> tuple[str, bool]:
        if weights_mapper is None or weights_mapper == renames_nothing:
            return remembered(name)
        return parse(name, weights_mapper)

    return run


#: What vLLM's ``lora_model`` module sees as ``safetensors`` once patched.
WHOLE_FILE_SAFETENSORS = SimpleNamespace(safe_open=WholeFile)


def read_adapters_whole() -> None:
    """Patch vLLM's ``lora_model`` module (once): ``WholeFile`` for ``safe_open``, and
    ``cached_parse``."""
    from vllm.lora import lora_model

    if lora_model.safetensors is WHOLE_FILE_SAFETENSORS:
        return
    lora_model.safetensors = WHOLE_FILE_SAFETENSORS
    lora_model.parse_fine_tuned_lora_name = cached_parse(lora_model.parse_fine_tuned_lora_name)
