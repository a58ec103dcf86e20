"""Start vLLM's engine core by forking the server process where that is safe.

vLLM's CPU platform always spawns the engine-core process, which then imports torch and
vLLM again: ~10 s of every start on 2 cores. When the model runs inside the engine core
(``cpu_worker`` inline), nothing there needs a fresh interpreter, so loraplex forks it, as
vLLM itself does on CUDA. One thing breaks a fork: once this process ran a parallel torch op
(converting the base model does), OpenMP's thread pool exists here, and a forked child's first
parallel op waits forever for pool threads the fork did not copy. A throwaway forked child
tries one such op first (``fork_runs_parallel_ops``, ~0.1 s); if it hangs, vLLM spawns.
A forked child does not load vLLM's plugins again, so an after-fork hook detaches it from the
server's process group where the plugin would have (``detach``). vLLM's compile cache key
holds the start method: a forked engine core and a spawned one (``cpu_worker`` process, or a
spawn after the check failed) each compile once into a cache entry of their own.
"""

from __future__ import annotations

import logging
import multiprocessing.util
import os
import signal
import time
from functools import partial
from typing import Any

from loraplex.engine.detach import detach_engine_process

log = logging.getLogger(__name__)


def fork_runs_parallel_ops(timeout: float = 10.0) -> bool:
    """Whether a forked child of this process completes a multi-threaded torch op."""
    import torch

    pid = os.fork()
    if pid == 0:  # the child: one op over enough elements to run on every torch thread
        code = 1
        try:
            torch.ones(1 << 20).add_(1)
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return False


def new_async_llm(engine_args: Any, stat_loggers: list[Any]) -> Any:
    """``AsyncLLM.from_engine_args``, forking the engine core when the model runs inline."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.executor import Executor

    config = engine_args.create_engine_config(UsageContext.ENGINE_CONTEXT)  # sets "spawn"
    inline = config.device_config.device_type == "cpu" and (
        os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
    )
    llm = partial(
        AsyncLLM,
        vllm_config=config,
        executor_class=Executor.get_class(config),
        log_requests=engine_args.enable_log_requests,
        log_stats=not engine_args.disable_log_stats,
        stat_loggers=stat_loggers,
    )
    if not inline:
        return llm()
    if not fork_runs_parallel_ops():
        log.warning(
            "spawning the engine core (+~10 s): this process already ran OpenMP threads, "
            "which a forked engine would wait for"
        )
        return llm()
    log.info("forking the engine core from the server process")
    multiprocessing.util.register_after_fork(detach_engine_process, lambda detach: detach())
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"  # vLLM's CPU platform set "spawn"
    return llm()
