"""vLLM's AsyncLLM embedded in the server process, with per-version LoRA ids and residency.

Creates the engine inside the running event loop (never at import: vLLM spawns workers),
hands each adapter version its own LoRA id, loads an adapter before its first request so a
bad adapter fails that request and not the engine, and mirrors vLLM's CPU LRU so that the
server can report residency and cache hits. vLLM is imported lazily so that loraplex stays
importable where it is not installed (training machines).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from loraplex.adapters import ResolvedAdapter
from loraplex.config import Settings
from loraplex.engine.lora_ids import LoraIdAllocator
from loraplex.engine.types import Delta, GenerationParams
from loraplex.errors import IncompatibleAdapter, InvalidRequest, Unavailable

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

log = logging.getLogger(__name__)


def resolve_dtype(dtype: str) -> str:
    """``auto`` means float32 on CPU and bfloat16 on CUDA.

    On CPU, bf16 made an adapter's greedy output depend on which other requests shared its
    batch (one tenant's traffic changing another's answer); fp32 costs ~1.4x throughput
    there but keeps batched == solo. On CUDA, bf16 is the norm.
    """
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def engine_args(settings: Settings, model_dir: str) -> Any:
    """vLLM ``AsyncEngineArgs`` from loraplex settings."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    # vLLM's CPU backend reads its KV cache size only from the environment.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.kv_cache_gib)
    return AsyncEngineArgs(
        model=model_dir,
        served_model_name=[settings.served_model_name],
        dtype=resolve_dtype(settings.dtype),
        enable_lora=True,
        max_loras=settings.max_loras,
        max_cpu_loras=settings.max_cpu_loras,
        max_lora_rank=settings.max_lora_rank,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        seed=settings.seed,
        disable_log_stats=True,
    )


class VllmEngine:
    """The ``Engine`` protocol over vLLM's ``AsyncLLM``."""

    def __init__(self, settings: Settings, model_dir: str) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        self.settings = settings
        self._llm = AsyncLLM.from_engine_args(engine_args(settings, model_dir))
        self._ids = LoraIdAllocator()
        self._resident: OrderedDict[str, int] = OrderedDict()
        self._pinned: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}

    async def stream(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        request_id: str,
        adapter: ResolvedAdapter | None,
    ) -> AsyncIterator[Delta]:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        lora = None
        if adapter is not None:
            await self.load(adapter)
            lora = self._request_for(adapter)
        try:
            sampling = SamplingParams(
                n=params.n,
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                stop=params.stop or None,
                seed=params.seed,
                ignore_eos=params.ignore_eos,
                output_kind=RequestOutputKind.DELTA,
            )
        except VLLMClientError as exc:
            raise InvalidRequest(f"Invalid sampling parameters: {exc}") from exc
        prompt: dict[str, Any] = {"prompt_token_ids": prompt_ids}
        if params.cache_salt:
            prompt["cache_salt"] = params.cache_salt
        try:
            async for output in self._llm.generate(prompt, sampling, request_id, lora_request=lora):
                for choice in output.outputs:
                    yield Delta(
                        index=choice.index,
                        text=choice.text,
                        token_count=len(choice.token_ids),
                        finish_reason=choice.finish_reason,
                        cached_tokens=output.num_cached_tokens or 0,
                    )
        except EngineDeadError as exc:
            raise Unavailable("The inference engine stopped; restart the server.") from exc
        except VLLMClientError as exc:
            raise InvalidRequest(f"The engine refused the request: {exc}") from exc

    async def load(self, adapter: ResolvedAdapter) -> bool:
        version = adapter.version
        if version in self._resident:
            self._resident.move_to_end(version)
            return True
        lock = self._locks.setdefault(version, asyncio.Lock())
        async with lock:
            if version in self._resident:
                return True
            try:
                await self._llm.add_lora(self._request_for(adapter))
            except Exception as exc:
                log.warning("adapter %s failed to load: %s", version, exc)
                raise IncompatibleAdapter(
                    f"Adapter {version} could not be loaded by the engine: {exc}"
                ) from exc
            self._resident[version] = self._ids.id_for(version)
            self._evict_mirror()
            return False

    async def unload(self, adapter: ResolvedAdapter) -> None:
        lora_id = self._ids.known(adapter.version)
        self._pinned.discard(adapter.version)
        if self._resident.pop(adapter.version, None) is not None and lora_id is not None:
            await self._llm.remove_lora(lora_id)

    async def pin(self, adapter: ResolvedAdapter) -> None:
        await self.load(adapter)
        await self._llm.pin_lora(self._ids.id_for(adapter.version))
        self._pinned.add(adapter.version)

    async def check_health(self) -> None:
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise Unavailable(f"The inference engine is not healthy: {exc}") from exc

    def residency(self) -> dict[str, str]:
        return {v: ("pinned" if v in self._pinned else "cpu") for v in self._resident}

    def unfinished_requests(self) -> int:
        return self._llm.get_num_unfinished_requests()

    def shutdown(self) -> None:
        self._llm.shutdown()

    def _request_for(self, adapter: ResolvedAdapter) -> LoRARequest:
        from vllm.lora.request import LoRARequest

        return LoRARequest(
            lora_name=adapter.version,
            lora_int_id=self._ids.id_for(adapter.version),
            lora_path=str(adapter.path),
        )

    def _evict_mirror(self) -> None:
        """Forget the least recently used unpinned versions beyond vLLM's CPU cache size."""
        capacity = self.settings.max_cpu_loras
        for version in list(self._resident):
            if len(self._resident) <= capacity:
                break
            if version not in self._pinned:
                del self._resident[version]
