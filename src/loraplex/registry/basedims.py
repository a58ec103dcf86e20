"""The linear layers of a Llama-family base model and their shapes, read from ``config.json``.

Adapters are checked against these: a target module must exist in the base, and each LoRA
tensor must fit the layer it adapts. Only the decoder's attention and MLP projections are
covered (the layers vLLM applies LoRA to in this family); embeddings and ``lm_head`` are not.
This module reads one JSON file; it never loads weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters import LINEAR_PROJECTIONS
from loraplex.errors import InvalidRequest


@dataclass(frozen=True)
class BaseDims:
    """The dimensions that fix every LoRA-able layer's shape."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> BaseDims:
        """Read the dims from ``model_dir/config.json`` (or its ``text_config``)."""
        path = model_dir / "config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidRequest(f"Cannot read the base model config {path}: {exc}") from None
        config = config.get("text_config", config)
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            return cls(
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_attention_heads=heads,
                num_key_value_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                num_hidden_layers=int(config["num_hidden_layers"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequest(f"Base model config {path} lacks a dimension: {exc}") from None

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """``(in_features, out_features)`` of each LoRA-able projection, by short name."""
        q_out = self.num_attention_heads * self.head_dim
        kv_out = self.num_key_value_heads * self.head_dim
        return {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }

    def module_paths(self) -> dict[str, str]:
        """Full module path (as PEFT names it, without its prefix) -> short name."""
        paths = {}
        for layer in range(self.num_hidden_layers):
            for short in LINEAR_PROJECTIONS:
                block = "mlp" if short in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                paths[f"model.layers.{layer}.{block}.{short}"] = short
        return paths
