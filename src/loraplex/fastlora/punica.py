"""vLLM punica wrapper for CPU that runs loraplex's fast LoRA ops.

It keeps vLLM's ``PunicaWrapperCPU`` for bookkeeping (index tensors, the full-linear path) and
replaces every LoRA matmul: one ``LoraPlan`` per step for the token mapping and one for the
sampler mapping (used by the lm_head LoRA), then ``ops`` per layer. vLLM always marks CPU
steps as prefill, so the plan, not ``is_prefill``, decides how tokens are grouped.

The layer-level entry points run as custom ops (``loraplex::lora_linear``, ``lora_shrink``,
``lora_expand``) that look the wrapper up by an integer key, so that a torch.compile'd model
calls them on every step instead of tracing one step's plan into its graph.

Imported only inside vLLM processes, through ``FastLoraCpuPlatform.get_punica_wrapper``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.library import Library
from vllm.lora.model_manager import LoRAModelManager
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
from vllm.utils.torch_utils import direct_register_custom_op

from loraplex.fastlora import ops
from loraplex.fastlora.activation import watch_activations
from loraplex.fastlora.hot_merge import HotMerge
from loraplex.fastlora.hot_policy import HotPolicy
from loraplex.fastlora.layer_jobs import LayerJobs
from loraplex.fastlora.layer_slices import lora_slices
from loraplex.fastlora.live import LiveSlots
from loraplex.fastlora.merge import watch_steps
from loraplex.fastlora.plan import LoraPlan
from loraplex.fastlora.slot_writes import SlotWrites, adapted_slices
from loraplex.fastlora.weights import LoraWeights

# Under vLLM's logger: its handlers are the ones set up in the engine's processes.
logger = logging.getLogger(f"vllm.{__name__}")

_WRAPPERS: dict[int, FastPunicaWrapperCPU] = {}
_KEYS = itertools.count(1)


def wrappers() -> list[FastPunicaWrapperCPU]:
    """The punica wrappers of this process (one per LoRA model manager)."""
    return list(_WRAPPERS.values())


class FastPunicaWrapperCPU(PunicaWrapperCPU):
    """PunicaWrapperCPU whose LoRA matmuls read adapter weights in place."""

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device, **kwargs):
        super().__init__(max_num_batched_tokens, max_batches, device, **kwargs)
        self._token_plan = LoraPlan(0, [], None)
        self._sampler_plan: LoraPlan | None = None
        self._resized: dict[tuple[str, int], LoraPlan] = {}
        self._writes = SlotWrites()
        self._weights = LoraWeights(writes=self._writes)
        self._live = LiveSlots(self._writes)
        self._key = next(_KEYS)
        _WRAPPERS[self._key] = self
        self.hot_merge = _hot_merge(self._live, self._writes)
        """The hot adapter merged into the base weights; None when ``merge_hot`` is off."""
        self._lora_ids: list[int | None] = []
        self._step_tokens: dict[int | None, int] = {}
        self._linear_plans: tuple[LoraPlan, LoraPlan | None] = (self._token_plan, None)
        self._linear_indices: tuple[torch.Tensor, torch.Tensor] | None = None
        self._resized_linear: dict[int, tuple[LoraPlan, LoraPlan]] = {}
        self._jobs = LayerJobs(self._live, self._weights)

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        self._token_plan = LoraPlan.build(self.token_lora_indices)
        self._sampler_plan = None
        self._resized = {}
        self._lora_ids = list(lora_index_to_id)
        if self.hot_merge is not None and self.hot_merge.policy is not None:
            slots, counts = torch.unique(self.token_lora_indices, return_counts=True)
            self._step_tokens = {
                self._lora_ids[slot] if slot >= 0 else None: count
                for slot, count in zip(slots.tolist(), counts.tolist(), strict=True)
            }
        self._plan_linears()

    def step(self, layers: list[Any]) -> None:
        """A forward step is about to run with the current mapping (``merge.watch_steps``):
        merge or unmerge the hot adapter before it (``hot_merge``)."""
        if self.hot_merge is not None and self.hot_merge.step(
            self._lora_ids, self._step_tokens, layers
        ):
            self._plan_linears()

    def _plan_linears(self) -> None:
        """The plans of the linear layers: the token plan, or with an adapter merged, one
        that leaves its tokens out and one that subtracts it from every other token."""
        self._resized_linear = {}
        merged = None if self.hot_merge is None else self.hot_merge.slot
        if merged is None:
            self._linear_plans, self._linear_indices = (self._token_plan, None), None
            return
        indices = self.token_lora_indices
        hot = indices == merged
        self._linear_indices = (torch.where(hot, -1, indices), torch.where(hot, -1, merged))
        self._linear_plans = (
            LoraPlan.build(self._linear_indices[0]),
            LoraPlan.build(self._linear_indices[1]),
        )

    def slot_written(self, slot: int, slots: int, layers: Iterable[tuple[Any, Any, bool]]) -> None:
        """vLLM wrote an adapter into ``slot`` of each ``(layer, weights, fresh)``
        (``activation.watch_activations``): bring that slot's zero flags and oneDNN packs up
        to date now, inside ``add_lora``, rather than in the next step (the first request of a
        preloaded version). A fresh layer's other slots are zero: not looked at."""
        self._writes.written(slot, slots)
        for layer, weights, fresh in layers:
            layer_slices = lora_slices(layer)
            adapted = adapted_slices(weights, len(layer_slices))
            for (lora_a, lora_b, size), written in zip(layer_slices, adapted, strict=True):
                if self._live.written(slot, lora_a, lora_b, written, fresh):
                    self._weights.refresh(lora_a, lora_b, slot, size)

    def _linear(self, num_rows: int) -> tuple[LoraPlan, LoraPlan | None]:
        """The linear layers' plans (``_plan_linears``) for ``num_rows`` rows."""
        if self._linear_indices is None:
            return self._token(num_rows), None
        if num_rows == self._linear_plans[0].num_tokens:
            return self._linear_plans
        resized = self._resized_linear.get(num_rows)
        if resized is None:
            # rows beyond the mapping are base rows: the merged adapter is taken out of them
            skip_hot = _resize(self._linear_indices[0], num_rows)
            subtract_hot = _resize(self._linear_indices[1], num_rows, self.hot_merge.slot)
            resized = (LoraPlan.build(skip_hot), LoraPlan.build(subtract_hot))
            self._resized_linear[num_rows] = resized
        return resized

    def _token(self, num_rows: int) -> LoraPlan:
        return self._fit(self._token_plan, lambda: self.token_lora_indices, num_rows, "token")

    def _sampler(self, num_rows: int) -> LoraPlan:
        """The plan of the lm_head LoRA for ``num_rows`` rows of hidden states.

        Sampled rows (one per request) follow the sampler mapping. Prompt logprobs are
        computed by vLLM one request chunk at a time, so their row count is neither the
        step's tokens nor its requests, and which request a chunk belongs to is not passed
        down; ``_fit`` then keeps the forward pass alive. That mapping changes nothing that
        loraplex serves: adapters are validated to adapt only the decoder's projections
        (``registry.basedims``), so every lm_head LoRA slot is zero and adds nothing to any
        row (tests/integration/test_fastlora_equality.py checks prompt logprobs against PEFT).
        """
        if num_rows == self._token_plan.num_tokens != len(self.sampler_indices):
            return self._token_plan  # logits of every token (prompt logprobs): token mapping
        if self._sampler_plan is None:
            self._sampler_plan = LoraPlan.build(self.sampler_indices)
        return self._fit(self._sampler_plan, lambda: self.sampler_indices, num_rows, "sampler")

    def _fit(
        self, plan: LoraPlan, indices: Callable[[], torch.Tensor], num_rows: int, kind: str
    ) -> LoraPlan:
        """The step's plan for ``num_rows`` input rows; never raises in the forward pass.

        vLLM maps one slot per row. Should a step's rows and mapping ever differ (padding,
        or logits for more rows than requests), rows beyond the mapping get no adapter and
        a longer mapping is cut to the rows: an exception here would fail every request in
        the batch and the engine with it. ``indices`` is read only then (vLLM slices it on
        every read).
        """
        if num_rows == plan.num_tokens:
            return plan
        key = (kind, num_rows)
        resized = self._resized.get(key)
        if resized is None:
            resized = LoraPlan.build(_resize(indices(), num_rows))
            self._resized[key] = resized
        return resized

    def add_shrink(self, y, x, lora_a_stacked, scale: float, **kwargs: Any) -> None:
        x = x.view(-1, x.shape[-1])
        for out, lora_a in zip(y, lora_a_stacked, strict=True):
            torch.ops.loraplex.lora_shrink(
                out.view(-1, out.shape[-1]), x, lora_a, float(scale), self._key
            )

    def add_expand(
        self,
        y: torch.Tensor,
        x,
        lora_b_stacked,
        output_slices,
        offset_start: int = 0,
        add_inputs=True,
        **kwargs: Any,
    ) -> None:
        y2 = y.view(-1, y.shape[-1])
        offset = offset_start
        for h, lora_b, size in zip(x, lora_b_stacked, output_slices, strict=True):
            torch.ops.loraplex.lora_expand(y2, h, lora_b, offset, size, bool(add_inputs), self._key)
            offset += size

    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs: bool = True, **kwargs):
        torch.ops.loraplex.lora_expand(
            y, x, lora_b_stacked, 0, y.shape[-1], bool(add_inputs), self._key
        )

    def add_lora_linear(
        self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kw
    ) -> None:
        # One opaque op per layer: under torch.compile the plan must be read when the step
        # runs, never baked into the traced graph.
        torch.ops.loraplex.lora_linear(
            y.view(-1, y.shape[-1]),
            x.view(-1, x.shape[-1]),
            list(lora_a_stacked),
            list(lora_b_stacked),
            float(scale),
            list(output_slices),
            self._key,
        )

    def run_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices) -> None:
        """The body of ``loraplex::lora_linear``: every slice of one linear layer.

        Slots whose weights are zero in a slice (a module their adapter does not adapt) add
        exactly zero there: their tokens are left out of it, and a slice where every slot
        the step uses is zero is skipped (see ``live``).
        """
        plan, subtract = self._linear(x.shape[0])
        if plan.empty and (subtract is None or subtract.empty):
            return
        jobs = self._jobs.get(
            plan, subtract, lora_a_stacked, lora_b_stacked, scale, output_slices, y.shape[1]
        )
        for sub, lora_a, lora_b, signed, offset, size, prepared in jobs:
            if prepared is not None and prepared.accepts(y, x):
                prepared.run(y, x)
            else:
                ops.lora_linear(sub, y, x, lora_a, lora_b, signed, offset, size, self._weights)

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kw):
        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        plan = self._sampler(x2.shape[0])
        live = self._live.live(plan.slots, lora_a_stacked, lora_b_stacked)
        if not live:
            return
        size = lora_b_stacked.shape[-2]
        plan = plan.only(live)
        ops.lora_linear(plan, y2, x2, lora_a_stacked, lora_b_stacked, scale, 0, size, self._weights)


def _hot_merge(live: LiveSlots, writes: SlotWrites) -> HotMerge | None:
    """Hot-adapter merging as the ``merge_hot*`` settings say; None when it is off."""
    from loraplex.config import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as exc:
        logger.error("%s; not merging hot adapters", exc.message)
        return None
    if settings.merge_hot != "on":
        return None
    policy = HotPolicy(
        merge_share=settings.merge_hot_share, horizon_tokens=settings.merge_hot_tokens
    )
    return HotMerge(policy, live, writes)


def _resize(indices: torch.Tensor, num_rows: int, pad: int = -1) -> torch.Tensor:
    """``indices`` cut to ``num_rows``, or padded with ``pad`` (-1: no adapter) up to it."""
    if indices.numel() >= num_rows:
        return indices[:num_rows]
    padding = torch.full((num_rows - indices.numel(),), pad, dtype=indices.dtype)
    return torch.cat([indices, padding.to(indices.device)])


def _lora_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scale: float,
    output_slices: list[int],
    wrapper: int,
) -> None:
    _WRAPPERS[wrapper].run_linear(y, x, lora_a, lora_b, scale, output_slices)


def _lora_shrink(
    out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, scale: float, wrapper: int
) -> None:
    ops.shrink(_WRAPPERS[wrapper]._token(x.shape[0]), out, x, lora_a, scale)


def _lora_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    lora_b: torch.Tensor,
    offset: int,
    size: int,
    add_inputs: bool,
    wrapper: int,
) -> None:
    ops.expand(_WRAPPERS[wrapper]._token(y.shape[0]), y, h, lora_b, offset, size, add_inputs)


def _nothing(*args) -> None:
    return None


watch_activations(LoRAModelManager)
watch_steps(LoRAModelManager)

_LIB = Library("loraplex", "FRAGMENT")
for _name, _impl, _mutated in [
    ("lora_linear", _lora_linear, "y"),
    ("lora_shrink", _lora_shrink, "out"),
    ("lora_expand", _lora_expand, "y"),
]:
    direct_register_custom_op(
        _name,
        _impl,
        mutates_args=[_mutated],
        fake_impl=_nothing,
        target_lib=_LIB,
        dispatch_key="CPU",
    )
