"""A full garbage collection in the server process, before and after the startup heap is
frozen (``server.app.freeze_startup_heap``, which the lifespan calls once the engine is up).

The process is built as ``loraplex serve`` builds it: vLLM's engine (``VllmEngine``, default
settings, the bundled model) in this process. A full (generation 2) collection traverses
every tracked object, and while it runs the event loop serves nothing: every stream stalls.
Prints the tracked objects, the median of ``--repeats`` full collections before and after
the freeze, and their ratio.

    .venv/bin/python -m bench.gc_pause                   # ~2 min on 2 cores (the compile)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import time

from bench._common import base_model_dir, write_result


def full_collections(repeats: int) -> float:
    """Median milliseconds of ``repeats`` full collections."""
    spent = []
    for _ in range(repeats):
        started = time.perf_counter()
        gc.collect()
        spent.append((time.perf_counter() - started) * 1e3)
    return statistics.median(spent)


async def measure(repeats: int) -> dict[str, float]:
    from loraplex.config import Settings
    from loraplex.engine.vllm_engine import VllmEngine
    from loraplex.server.app import freeze_startup_heap

    engine = VllmEngine(Settings(), str(base_model_dir()))
    try:
        tracked = len(gc.get_objects())
        before = full_collections(repeats)
        freeze_startup_heap()
        after = full_collections(repeats)
        frozen = gc.get_freeze_count()
        gc.unfreeze()
    finally:
        engine.shutdown()
        del engine
        gc.collect()  # the engine's cycles, before interpreter exit runs its finalizer
    return {
        "tracked_objects": tracked,
        "frozen_objects": frozen,
        "full_collection_ms_before": round(before, 3),
        "full_collection_ms_after": round(after, 3),
        "after_over_before": round(after / before, 6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    result = {
        "load_average_before": os.getloadavg(),
        **asyncio.run(measure(args.repeats)),
        "load_average_after": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    write_result("gc_pause", result)


if __name__ == "__main__":
    main()
