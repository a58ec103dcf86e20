"""Merge one LoRA slot into the base weights of vLLM's CPU linear layers, and back, exactly.

vLLM's CPU linear layers multiply by a oneDNN handle that holds the weight prepacked
(``dispatch_cpu_unquantized_gemm``) and then drop the weight. ``keep_base_weights`` wraps that
dispatch so that each layer keeps its weight (``_loraplex_weight``) and its handle
(``_loraplex_handle``). ``MergedSlot`` packs ``W + B @ A`` of one slot into a new handle for
each adapted layer, a few layers per step so that no step waits for all of them, then swaps
every pair of handles' pointers in place at once: the compiled graph reads the pointer from
the handle's tensor at every call, so it runs on the merged weights from the next step on,
and ``restore`` swaps them back (the original packing, bit for bit). Each handle object
always owns exactly one pointer, so each is freed once whatever happens.

Costs: the kept weights (one more copy of the linear layers), and a repack of the adapted
layers per merge. fp32 only: a merged 16-bit weight rounds differently from the unmerged sum.
Which rows then need which delta is the punica wrapper's job (``punica``).
"""

from __future__ import annotations

import functools
import time
from collections import deque
from typing import Any

import torch

#: The dtype a merge is exact enough in: greedy outputs equal the unmerged ones.
MERGE_DTYPES = (torch.float32,)


def keep_base_weights() -> None:
    """Wrap vLLM's CPU linear dispatch (once) so that every 2-D layer keeps its weight and
    the oneDNN handle it was packed into (None where vLLM chose another kernel)."""
    from vllm import _custom_ops
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "_loraplex_keeps_weights", False):
        return

    @functools.wraps(original)
    def dispatch(layer: Any, remove_weight: bool) -> None:
        weight = layer.weight
        created: list[Any] = []
        create = _custom_ops.create_onednn_mm

        def capture(*args: Any, **kwargs: Any) -> Any:
            created.append(create(*args, **kwargs))
            return created[-1]

        _custom_ops.create_onednn_mm = capture
        try:
            original(layer, remove_weight)
        finally:
            _custom_ops.create_onednn_mm = create
        if weight.ndim == 2 and not weight.is_meta:
            layer._loraplex_weight = weight.detach()
            layer._loraplex_handle = created[-1] if len(created) == 1 else None

    dispatch._loraplex_keeps_weights = True  # type: ignore[attr-defined]
    utils.dispatch_cpu_unquantized_gemm = dispatch


def watch_steps(manager_cls: Any) -> None:
    """Wrap ``manager_cls.set_adapter_mapping`` (once; vLLM calls it before every forward
    step) to call ``step(layers)`` on each of the manager's punica wrappers that has it;
    ``layers`` are the manager's LoRA linear layers that use that wrapper."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    original = manager_cls.set_adapter_mapping
    if getattr(original, "_loraplex_steps", False):
        return

    @functools.wraps(original)
    def set_adapter_mapping(self: Any, mapping: Any) -> None:
        original(self, mapping)
        for wrapper in self.punica_wrapper_mapping.values():
            step = getattr(wrapper, "step", None)
            if step is not None:
                linears = self.__dict__.setdefault("_loraplex_linears", {})
                layers = linears.get(id(wrapper))
                if layers is None:
                    layers = [
                        layer
                        for layer in self.modules.values()
                        if isinstance(layer, BaseLinearLayerWithLoRA)
                        and getattr(layer, "punica_wrapper", None) is wrapper
                    ]
                    linears[id(wrapper)] = layers
                step(layers)

    set_adapter_mapping._loraplex_steps = True  # type: ignore[attr-defined]
    manager_cls.set_adapter_mapping = set_adapter_mapping


def unmergeable(layer: Any) -> str | None:
    """Why ``layer`` (a vLLM LoRA linear layer) cannot be merged into; None when it can."""
    base = layer.base_layer
    weight = getattr(base, "_loraplex_weight", None)
    if weight is None:
        return "its base weight was not kept (start the engine with merge_hot on)"
    if getattr(base, "_loraplex_handle", None) is None:
        return "vLLM does not run it through a oneDNN handle"
    if weight.dtype not in MERGE_DTYPES:
        return f"it is {weight.dtype}, and merging is exact in float32 only"
    if getattr(layer, "tp_size", 1) != 1:
        return "it is sharded across devices"
    return None


class MergedSlot:
    """One slot's LoRA merged into the base layers it adapts: packed a few layers at a time
    (``prepare``), switched to in one go (``apply``), switched back by ``restore``."""

    def __init__(self, layers: list[tuple[Any, list[tuple[int, int, int]]]], slot: int) -> None:
        """To merge ``slot`` into each ``(layer, slices)``: ``slices`` are the
        ``(index, row offset, rows)`` of the layer's LoRA slices where the slot is live."""
        self.slot = slot
        self.layers = len(layers)
        self._todo = deque(layers)
        self._packed: list[tuple[Any, Any]] = []
        """(the layer's own handle, the merged weight's handle) of each packed layer."""
        self.applied = False
        self.packing_seconds = 0.0
        self.packing_steps = 0

    def prepare(self, seconds: float) -> bool:
        """Pack merged weights, layer by layer, for about ``seconds`` (one layer at least);
        whether every layer is packed. Nothing is served from them before ``apply``."""
        from vllm import _custom_ops

        began = time.perf_counter()
        while self._todo:
            layer, slices = self._todo.popleft()
            base = layer.base_layer
            merged = base._loraplex_weight.clone()
            for index, offset, rows in slices:
                lora_a = _slot(layer.lora_a_stacked[index], self.slot)
                lora_b = _slot(layer.lora_b_stacked[index], self.slot)[:rows]
                merged[offset : offset + rows].addmm_(lora_b, lora_a)
            handle = _custom_ops.create_onednn_mm(merged.t(), 32)
            self._packed.append((base._loraplex_handle, handle))
            if time.perf_counter() - began >= seconds:
                break
        self.packing_seconds += time.perf_counter() - began
        self.packing_steps += 1
        return not self._todo

    def apply(self) -> None:
        """Serve every layer from its merged weight (all packed: ``prepare`` returned True)."""
        if self._todo:
            raise RuntimeError("apply before every layer is packed")
        for original, merged in self._packed:
            _swap(original, merged)
        self.applied = True

    def restore(self) -> None:
        """Serve every layer from its own weight again, and free the merged ones."""
        if self.applied:
            for original, merged in self._packed:
                _swap(original, merged)
            self.applied = False
        self._packed.clear()
        self._todo.clear()


def _slot(stacked: torch.Tensor, slot: int) -> torch.Tensor:
    return stacked[slot, 0] if stacked.dim() == 4 else stacked[slot]


def _swap(a: Any, b: Any) -> None:
    """Exchange the oneDNN pointers of two handles in place (their tensors stay the same
    objects: a compiled graph holds the tensor, not the value)."""
    pointer = a.handler_tensor.item()
    a.handler_tensor.fill_(b.handler_tensor.item())
    b.handler_tensor.fill_(pointer)
