"""vLLM's oneDNN ops for tests of when LoRA weights are packed: the real ones where they can
pack bf16 on this CPU, else a stand-in whose "pack" is a copy and whose product is torch's,
so that the caching logic (which blocks are packed again, and when) is tested on any CPU."""

from __future__ import annotations

from typing import Any

import torch


class TorchOneDnn:
    """The two oneDNN ops ``fastlora.weights`` calls, computed by torch."""

    def create_onednn_mm(self, weight: torch.Tensor, batch: int) -> torch.Tensor:
        return weight.clone()

    def onednn_mm(self, handler: torch.Tensor, x: torch.Tensor, bias: Any) -> torch.Tensor:
        return x @ handler


def onednn_ops(real: Any | None) -> Any:
    """``real`` (``LoraWeights._onednn``) where it is available, else ``TorchOneDnn``."""
    return real if real is not None else TorchOneDnn()
