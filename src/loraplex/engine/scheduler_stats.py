"""A vLLM stat logger that keeps the scheduler's latest state in an ``EngineStats``.

vLLM reports running and waiting sequences and KV cache usage only to its stat loggers; this
one copies them for loraplex's /metrics. It logs nothing itself. vLLM is imported lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loraplex.engine.types import EngineStats


def stat_logger_factory(stats: EngineStats) -> Callable[[Any, int], Any]:
    """A per-engine stat logger factory for ``AsyncLLM.from_engine_args(stat_loggers=...)``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerSnapshot(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is None:
                return
            stats.running = scheduler_stats.num_running_reqs
            stats.waiting = scheduler_stats.num_waiting_reqs
            stats.kv_cache_usage = scheduler_stats.kv_cache_usage

        def log_engine_initialized(self) -> None:
            pass

    return SchedulerSnapshot
