"""Variable-length attention for packed rows: each example attends only within itself.

``use(model)`` registers ``varlen_attention`` with transformers under ``NAME`` and switches
the model to it. transformers builds no mask for an attention it does not know, so a step
neither makes a flex ``BlockMask`` nor checks the position ids for packing (a host sync
per forward). The boundaries come from ``loraplex.train.loss.collate`` instead, on the CPU:
``cu_seq_lens`` holds where every sequence of the flattened ``(rows * width)`` batch starts
(each example, and each row's padding tail), as FlashAttention's varlen kernels read them.
On CUDA the kernel is torch's ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention,
no extra package); on CPU each sequence runs through SDPA on its own (tests).
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

from loraplex.errors import InvalidRequest

NAME = "loraplex_varlen"


def cu_seq_lens(position_ids: Any) -> Any:
    """int32 starts of every sequence (positions restart at 0) in the flattened batch, plus
    the total: ``[0, ..., rows * width]``."""
    import torch

    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0, as_tuple=True)[0]
    return torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)


def available() -> bool:
    """Whether this torch has the FlashAttention varlen kernel (torch 2.10 or newer)."""
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def use(model: Any) -> None:
    """Register ``varlen_attention`` and make ``model`` use it (on CUDA: torch's varlen
    kernel must exist; its keyword arguments are read here, outside compiled code)."""
    import torch
    from transformers import AttentionInterface

    if model.device.type == "cuda":
        _CUDA_ARGS.update(_cuda_args())
    # the CPU path loops over sequences in Python: run it eagerly inside compiled layers
    _KERNELS["cpu"] = torch.compiler.disable(_reference)
    AttentionInterface.register(NAME, varlen_attention)
    model.set_attn_implementation(NAME)


_CUDA_ARGS: dict[str, Any] = {}  # set by use(): how this torch's varlen_attn takes its options
_KERNELS: dict[str, Any] = {}  # set by use(): the CPU path, kept out of torch.compile


def _cuda_args() -> dict[str, Any]:
    """GQA, causality and scale as this torch release's ``varlen_attn`` names them."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        raise InvalidRequest(
            "packed attention 'varlen' needs torch.nn.attention.varlen (torch 2.10 or newer)."
        ) from exc
    known = inspect.signature(varlen_attn).parameters
    return {
        "gqa": "enable_gqa" in known,
        "causal": {"is_causal": True} if "is_causal" in known else {"window_size": (-1, 0)},
        "scale": "scale" in known,
    }


def varlen_attention(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
    dropout: float = 0.0, scaling: float | None = None, **kwargs: Any,
) -> tuple[Any, None]:  # fmt: skip
    """transformers attention interface: ``query`` (B, H, S, D), ``key``/``value``
    (B, Hkv, S, D), ``cu_seq_lens_q`` in ``kwargs``; returns (B, S, H, D)."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        raise ValueError(f"attention {NAME!r} needs cu_seq_lens_q (packed rows from collate)")
    rows, heads, width, dim = query.shape
    q, k, v = _flat(query), _flat(key), _flat(value)
    kernel = _cuda if q.is_cuda else _KERNELS["cpu"]
    out = kernel(q, k, v, bounds.to(q.device), width, scaling)
    return out.reshape(rows, width, heads, dim), None


def _flat(states: Any) -> Any:
    """(B, H, S, D) -> (B * S, H, D), the varlen layout."""
    rows, heads, width, dim = states.shape
    return states.transpose(1, 2).reshape(rows * width, heads, dim)


def _cuda(q: Any, k: Any, v: Any, bounds: Any, width: int, scale: float | None) -> Any:
    """torch's FlashAttention varlen kernel, with the options ``use`` found for it."""
    from torch.nn.attention.varlen import varlen_attn

    extra: dict[str, Any] = dict(_CUDA_ARGS["causal"])
    if _CUDA_ARGS["gqa"]:
        extra["enable_gqa"] = True
    elif k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if _CUDA_ARGS["scale"] and scale is not None:
        extra["scale"] = scale
    # width bounds every sequence: a constant, so compiled layers see no new value
    return varlen_attn(q, k, v, bounds, bounds, width, width, **extra)


def _reference(q: Any, k: Any, v: Any, bounds: Any, width: int, scale: float | None) -> Any:
    """Causal SDPA over each sequence alone (CPU)."""
    import torch
    import torch.nn.functional as F

    out = torch.empty_like(q)
    edges = bounds.tolist()
    for start, end in zip(edges, edges[1:], strict=False):
        if end > start:
            part = [t[start:end].transpose(0, 1) for t in (q, k, v)]  # (H, L, D)
            out[start:end] = F.scaled_dot_product_attention(
                *part, is_causal=True, scale=scale, enable_gqa=True
            ).transpose(0, 1)
    return out
