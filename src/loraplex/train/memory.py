"""Choosing batch size and gradient checkpointing from the memory the device has.

An estimate, not a measurement: weights, the LoRA optimizer state, and per-token activations
of a Llama-family decoder with LoRA (dropout copies included) plus the fp32 logits of the
loss. The constants were fitted to a plain PEFT loop on an H200 (Llama-3.1-8B shape, seq
2048, batch 2: 62 GiB without checkpointing, 22 GiB with it) and err on the safe side:
they say 69 / 25 GiB where ``loraplex train`` peaked at 53 / 22 GiB. With Liger's fused
linear + cross-entropy (``loraplex.train.kernels``) the logits term drops out, so the same
memory takes a larger batch without checkpointing. The rule: the
largest power-of-two batch that fits without checkpointing; if not even one sequence fits,
checkpointing on and the largest batch that fits then. Either choice can be overridden.
``plan_batch`` reads the free memory of the device a run uses; nothing here allocates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.errors import InvalidRequest
from loraplex.train import kernels
from loraplex.train.options import TrainOptions

GIB = 1 << 30
HEADROOM = 0.85  # share of free memory the plan may fill
LAYER_HIDDEN_FACTOR = 25  # activations kept per layer per token, in units of hidden_size
LAYER_INTER_FACTOR = 6  # ... and of intermediate_size
LOGIT_BYTES = 14  # bytes per vocabulary entry per token: bf16 logits, fp32 copy, softmax, grad
CUDA_MAX_BATCH, CUDA_MAX_TOKENS = 64, 65536
CPU_MAX_BATCH, CPU_MAX_TOKENS = 8, 8192


@dataclass(frozen=True)
class Shape:
    """The few numbers of a decoder that fix its activation memory."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    vocab_size: int
    num_key_value_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: object) -> Shape:
        """Read the shape from a transformers ``PretrainedConfig``."""
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        return cls(
            hidden_size=hidden,
            intermediate_size=int(config.intermediate_size),
            num_hidden_layers=int(config.num_hidden_layers),
            vocab_size=int(config.vocab_size),
            num_key_value_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
        )


@dataclass(frozen=True)
class Plan:
    """A batch size, whether to checkpoint, and the bytes the plan expects to use."""

    batch_size: int
    gradient_checkpointing: bool
    estimated_bytes: int
    available_bytes: int

    def describe(self) -> str:
        """One line for the log."""
        ckpt = "on" if self.gradient_checkpointing else "off"
        return (
            f"batch size {self.batch_size}, gradient checkpointing {ckpt} "
            f"(estimated {self.estimated_bytes / GIB:.1f} of {self.available_bytes / GIB:.1f} GiB)"
        )


def bytes_per_token(
    shape: Shape, element_bytes: int, checkpointing: bool, fused_loss: bool = False
) -> int:
    """Activation bytes one token of one sequence keeps until backward (``fused_loss``: the
    fused linear + cross-entropy keeps no logits)."""
    kv = shape.num_key_value_heads * shape.head_dim
    layer = element_bytes * (
        LAYER_HIDDEN_FACTOR * shape.hidden_size
        + 2 * kv
        + LAYER_INTER_FACTOR * shape.intermediate_size
    )
    logits = 0 if fused_loss else LOGIT_BYTES * shape.vocab_size
    if checkpointing:
        return shape.num_hidden_layers * shape.hidden_size * element_bytes + layer + logits
    return shape.num_hidden_layers * layer + logits


def estimate(
    shape: Shape, fixed_bytes: int, seq_len: int, batch: int, element_bytes: int, ckpt: bool,
    fused_loss: bool = False,
) -> int:  # fmt: skip
    """Peak bytes of one training step at this batch size."""
    per_token = bytes_per_token(shape, element_bytes, ckpt, fused_loss)
    return fixed_bytes + batch * seq_len * per_token


def choose(
    shape: Shape,
    *,
    fixed_bytes: int,
    seq_len: int,
    available_bytes: int,
    element_bytes: int,
    max_batch: int,
    max_tokens: int,
    batch_size: int | None = None,
    checkpointing: bool | None = None,
    fused_loss: bool = False,
) -> Plan:
    """Pick what the caller left as ``None``; ``fixed_bytes`` = weights + optimizer state."""
    budget = int(available_bytes * HEADROOM)

    def plan(ckpt: bool) -> Plan:
        batch = batch_size
        if batch is None:
            batch = 1
            while (
                batch * 2 <= max_batch
                and batch * 2 * seq_len <= max_tokens
                and estimate(
                    shape, fixed_bytes, seq_len, batch * 2, element_bytes, ckpt, fused_loss
                )
                <= budget
            ):
                batch *= 2
        use = estimate(shape, fixed_bytes, seq_len, batch, element_bytes, ckpt, fused_loss)
        return Plan(batch, ckpt, use, available_bytes)

    plans = [
        plan(ckpt) for ckpt in ([checkpointing] if checkpointing is not None else [False, True])
    ]
    return next((p for p in plans if p.estimated_bytes <= budget), plans[-1])


def host_available_bytes() -> int:
    """MemAvailable of this Linux host (the whole RAM elsewhere, if it can be read)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_batch(env: Any, opts: TrainOptions, longest: int, saved: dict | None) -> Plan:
    """Batch size and checkpointing: the checkpointed run's on resume, else from memory."""
    import torch

    batch, ckpt = opts.batch_size, opts.gradient_checkpointing
    if saved is not None:
        batch, ckpt = saved["batch_size"], saved["gradient_checkpointing"]
        if opts.batch_size not in (None, batch):
            raise InvalidRequest(f"--resume: the run was started with --batch-size {batch}.")
    if env.device == "cuda":
        available = torch.cuda.mem_get_info()[0] + torch.cuda.memory_allocated()
        limits = (CUDA_MAX_BATCH, CUDA_MAX_TOKENS)
    else:
        available = host_available_bytes() + _param_bytes(env.model)
        limits = (CPU_MAX_BATCH, CPU_MAX_TOKENS)
    element = 2 if env.precision == "bf16" else 4
    lora_params = _lora_param_estimate(env.model, opts)
    return choose(
        Shape.from_config(env.model.config),
        fixed_bytes=_param_bytes(env.model) + 16 * lora_params,
        seq_len=min(longest, opts.max_seq_len),
        available_bytes=available,
        element_bytes=element,
        max_batch=limits[0],
        max_tokens=limits[1],
        batch_size=batch,
        checkpointing=ckpt,
        fused_loss=opts.fused_kernels is not False
        and kernels.available(env.device, env.model.config.model_type),
    )


def _param_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _lora_param_estimate(model: Any, opts: TrainOptions) -> int:
    import torch

    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in opts.target_modules:
            total += opts.r * (module.in_features + module.out_features)
    return total
