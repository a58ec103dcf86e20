"""vLLM's AsyncLLM embedded in the server process, with per-version LoRA ids and residency.

Creates the engine inside the running event loop (never at import: vLLM spawns workers),
hands each adapter version its own LoRA id, and checks and loads an adapter before its first
request so that a bad adapter fails that request and not the engine (``adapter_fit``); a
version that failed is refused for a while without asking the engine (``failed_loads``).
Load, unload, pin and eviction run one at a time under one lock, and loraplex, not vLLM,
decides what leaves the engine's CPU cache (``residency``: bounded in count and bytes, never
a version with streams in flight), so the server's residency is what the engine holds.
vLLM is imported lazily so that loraplex stays importable where it is not installed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraplex.adapters import ResolvedAdapter
from loraplex.config import Settings
from loraplex.engine.adapter_fit import AdapterFit
from loraplex.engine.engine_core_start import new_async_llm
from loraplex.engine.failed_loads import FailedLoads
from loraplex.engine.lora_ids import LoraIdAllocator
from loraplex.engine.residency import Residency
from loraplex.engine.scheduler_stats import stat_logger_factory
from loraplex.engine.types import Delta, EngineStats, GenerationParams, TokenLogprob
from loraplex.errors import (
    IncompatibleAdapter,
    InvalidRequest,
    LoraplexError,
    TooLarge,
    Unavailable,
)

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

log = logging.getLogger(__name__)


def resolve_dtype(dtype: str) -> str:
    """``auto`` means float32 on CPU and bfloat16 on CUDA.

    On CPU, bf16 made an adapter's greedy output depend on which other requests shared its
    batch (one tenant's traffic changing another's answer); fp32 costs ~1.4x throughput
    there but keeps batched == solo to the token (not to the bit: a request's logprobs
    alone and batched differ in the last place; bench/README.md, "Batch invariance in
    bf16"). On CUDA, bf16 is the norm.
    """
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def inline_cpu_worker(cpu_worker: str) -> bool:
    """Whether vLLM should run the model in its engine-core process (see ``cpu_worker``).

    vLLM on CPU gives the model a worker process of its own and keeps one core for the
    scheduler's busy loop: on a 2-core machine the model gets one core, and every start
    spawns and imports vLLM once more (~10 s). Inline, the engine-core process runs the
    model on all its threads. Only a core binding (``VLLM_CPU_OMP_THREADS_BIND``, which
    Ray Serve replicas set) needs the worker process, which is where vLLM applies it.
    """
    if cpu_worker != "auto":
        return cpu_worker == "inline"
    return not os.environ.get("VLLM_CPU_OMP_THREADS_BIND")


HOT_MERGE_REPORT = "loraplex.fastlora.worker_extension.HotMergeReport"

#: How long a /metrics scrape waits for the engine's hot-merge report (it is answered between
#: engine steps); past it the last report is shown.
HOT_MERGE_REPORT_SECONDS = 2.0


def engine_args(settings: Settings, model_dir: str) -> Any:
    """vLLM ``AsyncEngineArgs`` from loraplex settings."""
    import torch
    from vllm.engine.arg_utils import AsyncEngineArgs

    if not torch.cuda.is_available() and inline_cpu_worker(settings.cpu_worker):
        # vLLM's CPU platform keeps its single-process executor only with this off; the
        # engine core still runs in a process of its own (engine_core_start).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # Unset, vLLM drops the model's process to one torch thread "for serving" (right for
        # its scheduler process, not for the process that runs the model).
        os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    # vLLM's CPU backend reads its KV cache size only from the environment.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.kv_cache_gib)
    # vLLM's compile cache under loraplex's home (unless set): a restart loads the compiled
    # model instead of compiling it again, and other checkouts or vLLM installs sharing
    # ~/.cache/vllm cannot overwrite it with artifacts traced from their own source files.
    os.environ.setdefault("VLLM_CACHE_ROOT", str(settings.home / "compile-cache"))
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
        max_logprobs=settings.max_logprobs,
        enforce_eager=settings.enforce_eager,
        disable_log_stats=False,  # scheduler stats feed /metrics (scheduler_stats.py)
        # what the hot-adapter merge is doing, for /metrics (collective_rpc)
        worker_extension_cls=HOT_MERGE_REPORT if settings.merge_hot == "on" else "",
    )


def _structured(json_format: dict[str, Any] | bool | None) -> Any:
    """vLLM's structured-output constraint for a JSON schema (True: any JSON object)."""
    if json_format is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if json_format is True:
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=json_format)


def token_logprobs(ids: Any, entries: Any) -> tuple[TokenLogprob, ...]:
    """vLLM's per-position ``{token_id: Logprob}`` as ``TokenLogprob`` (-inf clamped to -9999
    as OpenAI does, alternatives most likely first)."""
    out = []
    for token_id, entry in zip(ids, entries, strict=True):
        chosen = entry[token_id]
        ranked = sorted(entry.values(), key=lambda lp: lp.rank or 0)
        top = tuple((lp.decoded_token or "", max(lp.logprob, -9999.0)) for lp in ranked)
        out.append(TokenLogprob(chosen.decoded_token or "", max(chosen.logprob, -9999.0), top))
    return tuple(out)


class VllmEngine:
    """The ``Engine`` protocol over vLLM's ``AsyncLLM``."""

    def __init__(self, settings: Settings, model_dir: str, llm: Any = None) -> None:
        """``llm``: an ``AsyncLLM`` already made (tests); default: one from ``settings``."""
        self.settings = settings
        self._stats = EngineStats()
        self._fit = AdapterFit(settings, Path(model_dir), resolve_dtype(settings.dtype))
        if llm is None:
            llm = new_async_llm(
                engine_args(settings, model_dir), stat_loggers=[stat_logger_factory(self._stats)]
            )
        self._llm = llm
        self._ids = LoraIdAllocator()
        self._residency = Residency(
            settings.max_cpu_loras, settings.adapter_cache_mb * 2**20, settings.pin_limit
        )
        self._failed = FailedLoads(settings.failed_load_seconds)
        self._lock = asyncio.Lock()  # one load/unload/pin/eviction at a time
        self._pending: set[asyncio.Task[None]] = set()

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

        try:
            sampling = SamplingParams(
                n=params.n,
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                stop=params.stop or None,
                seed=params.seed,
                ignore_eos=params.ignore_eos,
                presence_penalty=params.presence_penalty,
                repetition_penalty=params.repetition_penalty,
                top_k=params.top_k,
                min_p=params.min_p,
                frequency_penalty=params.frequency_penalty,
                logit_bias=params.logit_bias,
                logprobs=params.logprobs,
                prompt_logprobs=params.prompt_logprobs,
                structured_outputs=_structured(params.json_format),
                output_kind=RequestOutputKind.DELTA,
            )
        except (VLLMClientError, ValueError) as exc:
            raise InvalidRequest(f"Invalid sampling parameters: {exc}") from exc
        prompt: dict[str, Any] = {"prompt_token_ids": prompt_ids}
        if params.cache_salt:
            prompt["cache_salt"] = params.cache_salt
        lora = None
        if adapter is not None:
            await self._acquire(adapter)
            lora = self._request_for(adapter)
        try:
            async for delta in self._generate(prompt, sampling, request_id, lora):
                yield delta
        finally:
            if adapter is not None:
                self._release(adapter.version)

    async def prompt_logprobs(
        self, prompt_ids: list[int], request_id: str, adapter: ResolvedAdapter | None
    ) -> list[float]:
        """The log-probability of each prompt token after the ones before it (the first token,
        which has no context, is left out): scoring, as the eval gate's answer loss needs."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        sampling = SamplingParams(
            max_tokens=1, prompt_logprobs=0, output_kind=RequestOutputKind.FINAL_ONLY
        )
        lora = None
        if adapter is not None:
            await self._acquire(adapter)
            lora = self._request_for(adapter)
        try:
            final = None
            async for output in self._llm.generate(
                {"prompt_token_ids": prompt_ids}, sampling, request_id, lora_request=lora
            ):
                final = output
        except EngineDeadError as exc:
            raise Unavailable("The inference engine stopped; restart the server.") from exc
        finally:
            if adapter is not None:
                self._release(adapter.version)
        if final is None or final.prompt_logprobs is None:
            raise Unavailable("The engine returned no prompt log-probabilities.")
        return [
            entry[token].logprob
            for token, entry in zip(prompt_ids[1:], final.prompt_logprobs[1:], strict=True)
        ]

    async def _generate(
        self, prompt: dict[str, Any], sampling: Any, request_id: str, lora: LoRARequest | None
    ) -> AsyncIterator[Delta]:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        prompt_pending = sampling.prompt_logprobs is not None
        try:
            async for output in self._llm.generate(prompt, sampling, request_id, lora_request=lora):
                prompt_logprobs = None
                if prompt_pending and output.prompt_logprobs is not None:
                    prompt_pending = False
                    prompt_logprobs = self._prompt_logprobs(
                        output.prompt_token_ids, output.prompt_logprobs
                    )
                for choice in output.outputs:
                    yield Delta(
                        index=choice.index,
                        text=choice.text,
                        token_count=len(choice.token_ids),
                        finish_reason=choice.finish_reason,
                        cached_tokens=output.num_cached_tokens or 0,
                        logprobs=(
                            None
                            if choice.logprobs is None
                            else token_logprobs(choice.token_ids, choice.logprobs)
                        ),
                        prompt_logprobs=prompt_logprobs,
                    )
                    prompt_logprobs = None
        except EngineDeadError as exc:
            raise Unavailable("The inference engine stopped; restart the server.") from exc
        except VLLMClientError as exc:
            raise InvalidRequest(f"The engine refused the request: {exc}") from exc

    def _prompt_logprobs(self, ids: list[int], entries: Any) -> tuple[TokenLogprob, ...]:
        """The prompt's tokens with their logprobs; the first token (no logprob) decoded here."""
        first = TokenLogprob(self._llm.get_tokenizer().decode(ids[:1]), None)
        return (first, *token_logprobs(ids[1:], list(entries)[1:]))

    async def load(self, adapter: ResolvedAdapter) -> bool:
        version = adapter.version
        if self._residency.serving(version):
            self._residency.touch(version)
            return True
        self._failed.check(version)
        async with self._lock:
            return await self._load_locked(adapter)

    async def _load_locked(self, adapter: ResolvedAdapter) -> bool:
        version = adapter.version
        entry = self._residency.get(version)
        if entry is not None:
            if entry.leaving:
                self._residency.keep(version)  # an unload still waiting on streams: cancel it
            return True
        self._failed.check(version)
        log.info("engine: loading adapter %s", version)
        try:
            began = time.perf_counter()
            nbytes = await asyncio.to_thread(self._fit.check, adapter)
            checked = time.perf_counter()
            victims = self._residency.victims(version, nbytes)
            for victim in victims:
                log.info("engine: evicting adapter %s to make room for %s", victim, version)
                self._residency.leave(victim)
                self._stats.evictions += 1
            await self._remove_then_add(victims, adapter)
            log.debug(
                "engine: loaded %s: fetch %.1f ms, checks %.1f ms, vLLM add_lora "
                "(after %d removals) %.1f ms",
                version,
                adapter.fetch_seconds * 1e3,
                (checked - began) * 1e3,
                len(victims),
                (time.perf_counter() - checked) * 1e3,
            )
        except (Unavailable, TooLarge):
            raise  # the cache is full or the engine is down: nothing to remember
        except LoraplexError as exc:
            self._remember(version, exc)
            raise
        except Exception as exc:
            self._engine_error(exc)
            error = IncompatibleAdapter(
                f"Adapter {version} could not be loaded by the engine: {exc}"
            )
            self._remember(version, error)
            raise error from exc
        self._failed.forget(version)
        self._residency.add(version, nbytes)
        return False

    async def _remove_then_add(self, victims: list[str], adapter: ResolvedAdapter) -> None:
        """Remove ``victims`` from the engine, then add ``adapter``, in one round trip: the
        engine core runs utility calls in the order they were sent, so the removals make room
        before the add without waiting for their replies (~2 ms a load here). Every call has
        finished when this returns or raises (the first error, removals' first)."""
        calls = [self._remove(victim) for victim in victims]
        calls.append(self._llm.add_lora(self._request_for(adapter)))
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result

    def _remember(self, version: str, error: LoraplexError) -> None:
        self._failed.record(version, error)
        log.warning(
            "engine: adapter %s failed to load: %s (refused for %.0f s without asking the engine)",
            version,
            error.message,
            self._failed.ttl,
        )

    def _engine_error(self, exc: Exception) -> None:
        """Raise ``Unavailable`` if ``exc`` means the engine is dead (not the adapter's fault)."""
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, EngineDeadError):
            raise Unavailable("The inference engine stopped; restart the server.") from exc

    async def _acquire(self, adapter: ResolvedAdapter) -> None:
        """Make ``adapter`` serve and count a stream on it (it cannot leave meanwhile)."""
        while True:
            await self.load(adapter)
            if self._residency.acquire(adapter.version):
                return

    def _release(self, version: str) -> None:
        if self._residency.release(version):
            task = asyncio.get_running_loop().create_task(self._finish_leaving(version))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _finish_leaving(self, version: str) -> None:
        """Remove a version whose unload waited for its last stream, unless it was kept."""
        async with self._lock:
            entry = self._residency.get(version)
            if entry is not None and entry.leaving and entry.in_flight == 0:
                await self._remove(version)

    async def _remove(self, version: str) -> None:
        lora_id = self._ids.known(version)
        if lora_id is not None:
            await self._llm.remove_lora(lora_id)
        self._residency.remove(version)
        log.info("engine: removed adapter %s", version)

    async def unload(self, adapter: ResolvedAdapter) -> int:
        version = adapter.version
        async with self._lock:
            if self._residency.get(version) is None:
                return 0
            in_flight = self._residency.leave(version)
            if in_flight == 0:
                await self._remove(version)
            return in_flight

    async def pin(self, adapter: ResolvedAdapter) -> None:
        self._failed.check(adapter.version)
        async with self._lock:
            self._residency.check_pin(adapter.version)
            await self._load_locked(adapter)
            await self._llm.pin_lora(self._ids.id_for(adapter.version))
            self._residency.pin(adapter.version)

    async def check_health(self) -> None:
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise Unavailable(f"The inference engine is not healthy: {exc}") from exc

    def residency(self) -> dict[str, str]:
        return self._residency.snapshot()

    async def residency_and_engine(self) -> tuple[dict[str, str], list[str]]:
        async with self._lock:  # every residency change happens under it
            ids = await self._llm.list_loras()
            residency = self._residency.snapshot()
        return residency, sorted(self._ids.version_of(i) or f"id {i}" for i in ids)

    def failed_loads(self) -> list[dict[str, object]]:
        return self._failed.report()

    def unfinished_requests(self) -> int:
        return self._llm.get_num_unfinished_requests()

    def stats(self) -> EngineStats:
        return self._stats

    async def refresh_stats(self) -> None:
        """Ask the engine's worker what the hot-adapter merge is doing (``merge_hot`` on)."""
        if self.settings.merge_hot != "on":
            return
        try:
            async with asyncio.timeout(HOT_MERGE_REPORT_SECONDS):
                (report, *_) = await self._llm.collective_rpc("loraplex_hot_merge")
        except Exception as exc:  # noqa: BLE001 - a scrape shows the last report instead
            log.warning("engine: no hot-merge report for /metrics: %r", exc)
            return
        merged = report["merged"]
        self._stats.hot_merged = None if merged is None else self._ids.version_of(merged)
        self._stats.hot_merges = report["merges"]
        self._stats.hot_unmerges = report["unmerges"]

    def shutdown(self) -> None:
        self._llm.shutdown()

    def _request_for(self, adapter: ResolvedAdapter) -> LoRARequest:
        from vllm.lora.request import LoRARequest

        return LoRARequest(
            lora_name=adapter.version,
            lora_int_id=self._ids.id_for(adapter.version),
            lora_path=str(adapter.path),
        )
