"""Cold load, phase by phase: where a version's first request spends its time (one process).

The registry side runs as a registry-backed server runs it, per blob store (``disk``: the
local folder store; ``s3``: a ``moto_server`` endpoint): the catalog lookup, the fetch into an
empty blob cache (the store's ``get`` and the cache's checks), and the engine's pre-load check
(``AdapterFit``). The engine side is vLLM's ``LLM`` in this process (fast LoRA on, the
hot_swap bench's engine settings): a 1-token completion for a version never loaded (cold),
the same again (warm), and one for a version first added with ``add_lora`` (preloaded), with
the time vLLM spends reading the adapter, registering it, activating it into a slot (the
fast-LoRA refresh of that slot included) and, inside the step, in the fast-LoRA caches
(slot row bounds, layer jobs, oneDNN packs). Median of ``--repeats`` versions each; the
engine's first cold load is also shown alone (the fast-LoRA caches see every layer then).

``--max-loras`` sets the engine's slots (and CPU cache entries). With the default 8, each of
the first 8 versions loaded lands in a slot never written before; with 2, slots are reused
from the third version on, as on a server past its first loads.

    .venv/bin/python -m bench.cold_load                  # ~1 min on 2 cores (quiet)
    .venv/bin/python -m bench.cold_load --dtype float32 --stores disk --repeats 9 --max-loras 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench._common import SCRATCH, Engine, adapter_paths, base_model_dir, make_adapters
from bench.hot_swap import store_settings

Spent = defaultdict[str, float]


def timed(owner: Any, name: str, phase: str, spent: Spent) -> None:
    """Wrap ``owner.name`` so that each call adds its seconds to ``spent[phase]`` and one to
    ``spent[phase + " #"]``."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[phase] += time.perf_counter() - started
            spent[phase + " #"] += 1

    setattr(owner, name, wrapper)


@contextmanager
def phases(spent: Spent) -> Iterator[Spent]:
    """``spent`` emptied on entry; what the block spent (ms, and calls), once it ends."""
    spent.clear()
    started = time.perf_counter()
    result: Spent = defaultdict(float)
    yield result
    result.update({k: v if k.endswith(" #") else v * 1e3 for k, v in spent.items()})
    result["total"] = (time.perf_counter() - started) * 1e3


def registry_phases(kind: str, engine: Engine, folder: Path, repeats: int) -> list[Spent]:
    """Lookup, fetch and check of ``repeats`` versions never fetched on this 'server'."""
    from loraplex.adapter_sources import RegistryAdapterSource
    from loraplex.config import Settings
    from loraplex.engine.adapter_fit import AdapterFit
    from loraplex.registry import blobs
    from loraplex.registry.registry import open_registry

    spent: Spent = defaultdict(float)
    root = SCRATCH / f"cold_load-{kind}-{uuid.uuid4().hex[:6]}"
    with ExitStack() as stack:
        settings = store_settings(kind, root, engine, stack)
        pusher = open_registry(Settings(home=root / "pusher", **settings))
        keys = [
            pusher.push(path, name).version.key for name, path in adapter_paths(folder, repeats)
        ]
        server_settings = Settings(home=root / "server", max_lora_rank=16, **settings)
        registry = open_registry(server_settings)
        fit = AdapterFit(server_settings, engine.base, engine.dtype)
        source = RegistryAdapterSource(registry, fit.spec.fingerprint, 16, spec=fit.spec)
        timed(registry, "resolve", "lookup", spent)
        timed(registry.blobs, "get", "fetch: store get", spent)
        timed(blobs.os, "fsync", "fetch: fsync", spent)
        results = []
        for key in keys:
            with phases(spent) as result:
                adapter = source.resolve(key)
                result["fetch (resolve - lookup)"] = adapter.fetch_seconds * 1e3
                began = time.perf_counter()
                fit.check(adapter)
                result["engine check"] = (time.perf_counter() - began) * 1e3
            results.append(result)
        registry.close()
        pusher.close()
    return results


def engine_phases(engine: Engine, folder: Path, repeats: int) -> dict[str, list[Spent]]:
    """vLLM in this process: cold, warm and preloaded 1-token completions."""
    from vllm import SamplingParams
    from vllm.lora.model_manager import LRUCacheLoRAModelManager
    from vllm.lora.request import LoRARequest
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    from loraplex.fastlora import weights
    from loraplex.fastlora.layer_jobs import LayerJobs
    from loraplex.fastlora.live import LiveSlots
    from loraplex.fastlora.punica import FastPunicaWrapperCPU

    spent: Spent = defaultdict(float)
    timed(LRUCacheWorkerLoRAManager, "_load_adapter", "vLLM read adapter", spent)
    timed(LRUCacheLoRAModelManager, "add_adapter", "vLLM register", spent)
    timed(LRUCacheLoRAModelManager, "activate_adapter", "vLLM activate (slot writes)", spent)
    timed(FastPunicaWrapperCPU, "slot_written", "  of which fast-LoRA slot_written", spent)
    timed(LiveSlots, "rows", "fast-LoRA slot row bounds (all calls)", spent)
    timed(LayerJobs, "get", "fast-LoRA layer jobs (all calls)", spent)
    timed(weights.LoraWeights, "packed", "fast-LoRA packed lookups (all calls)", spent)
    llm = engine.in_process_llm()
    from vllm import _custom_ops

    timed(_custom_ops, "create_onednn_mm", "fast-LoRA oneDNN packs", spent)
    params = SamplingParams(max_tokens=1, temperature=0)
    prompt = "The weather today is"

    def complete(request: LoRARequest | None) -> None:
        llm.generate([prompt], params, lora_request=request, use_tqdm=False)

    paths = adapter_paths(folder, 2 * repeats)
    requests = [LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(paths)]
    complete(None)
    out: dict[str, list[Spent]] = {"cold": [], "warm": [], "preloaded": []}
    for request in requests[:repeats]:
        for kind in ("cold", "warm"):
            with phases(spent) as result:
                complete(request)
            out[kind].append(result)
    for request in requests[repeats:]:
        with phases(spent) as added:
            llm.llm_engine.add_lora(request)
        with phases(spent) as result:
            complete(request)
        result.update({f"(add_lora before it) {k}": v for k, v in added.items()})
        out["preloaded"].append(result)
    out["first cold (the engine's first load)"] = out["cold"][:1]
    return out


def medians(samples: list[Spent]) -> dict[str, float]:
    """Each phase's median over ``samples`` (0 where a sample lacks it)."""
    keys = sorted({k for s in samples for k in s})
    return {k: round(statistics.median(s.get(k, 0.0) for s in samples), 2) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", default="disk,s3")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--max-loras", type=int, default=Engine.max_loras)
    args = parser.parse_args()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    engine = Engine(base_model_dir(), dtype=args.dtype, max_lora_rank=16)
    if args.max_loras != engine.max_loras:
        slots = args.max_loras
        engine = dataclasses.replace(engine, max_loras=slots, max_cpu_loras=slots)
    folder = make_adapters(engine.base, 2 * args.repeats, 16, ["q_proj", "v_proj"])
    report: dict[str, Any] = {"load_average_before": os.getloadavg()}
    for kind in args.stores.split(","):
        report[f"registry {kind}"] = medians(registry_phases(kind, engine, folder, args.repeats))
    if not args.skip_engine:
        for kind, samples in engine_phases(engine, folder, args.repeats).items():
            report[f"engine {kind}"] = medians(samples)
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
