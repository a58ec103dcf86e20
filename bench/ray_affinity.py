"""Ray Serve: adapter-affinity routing vs spreading, on the same two replicas and workload.

Starts ``loraplex serve --ray --replicas 2`` twice over the same folder of random adapters,
once with ``--affinity`` (requests go to replicas holding their adapter) and once with
``--no-affinity`` (Ray Serve's power-of-two-choices over both replicas, the "more pods behind
a load balancer" baseline), runs the same seeded streamed workload (``--adapters`` adapters,
Zipf popularity) and reports the adapter cache hit ratio summed over both replicas' own
metrics (found through ``/ray/targets``) and TTFT p50/p99. Each replica's engine cache holds
fewer adapters than the workload uses (``--max-cpu-loras``), so spreading must evict. Writes
``bench/results/ray_affinity.json``. Small defaults; each server start takes minutes on CPU.

    .venv/bin/python -m bench.ray_affinity
    .venv/bin/python -m bench.ray_affinity --adapters 6 --requests 16 --concurrency 2 \
        --max-tokens 8 --max-loras 2 --max-cpu-loras 3   # a quick check that it runs
    .venv/bin/python -m bench.ray_affinity --adapters 16 --requests 256 --concurrency 16
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import httpx

from bench._common import (
    SCRATCH,
    SERVED_NAME,
    Engine,
    adapter_paths,
    add_workload_options,
    base_model_dir,
    make_adapters,
    measure,
    ratio,
    write_result,
)
from loraplex.client.bench.report import HITS, MISSES
from loraplex.testing.launcher import running_server
from loraplex.testing.scrape import metric_sum


def replica_metrics(url: str, replicas: int) -> list[str]:
    """Each replica's own metrics URL, once all ``replicas`` registered one."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        groups = httpx.get(url + "/ray/targets", timeout=30).json()
        if len(groups) == replicas:
            return [f"http://{g['targets'][0]}" for g in groups]
        time.sleep(1)
    raise TimeoutError(f"{replicas} replicas did not register metrics ports")


def cache_counts(targets: list[str]) -> tuple[float, float]:
    """(hits, misses) of the adapter cache, summed over the replicas."""
    return sum(metric_sum(t, HITS) for t in targets), sum(metric_sum(t, MISSES) for t in targets)


def run(engine: Engine, folder: Any, affinity: bool, args: argparse.Namespace) -> dict[str, Any]:
    env = {
        "LORAPLEX_AUTH": "off",
        "LORAPLEX_ADAPTERS_DIR": str(folder),
        "LORAPLEX_BASE_MODEL": str(engine.base),
        "LORAPLEX_SERVED_MODEL_NAME": SERVED_NAME,
        **{f"LORAPLEX_{k.upper()}": str(v) for k, v in engine.describe().items() if k != "base"},
    }
    command = [sys.executable, "-m", "loraplex.cli", "serve", "--ray", "--replicas", "2"]
    command += ["--port", "0", "--affinity" if affinity else "--no-affinity"]
    command += ["--adapters-per-replica", str(engine.max_cpu_loras)]
    log = SCRATCH / f"ray-affinity-{affinity}.log"
    names = [n for n, _ in adapter_paths(folder, args.adapters)]
    with running_server(command, log, env=env, timeout=1200) as server:
        targets = replica_metrics(server.url, 2)
        hits0, misses0 = cache_counts(targets)
        report = measure(
            server.url,
            adapter_names=names,
            adapters=len(names),
            base_model=SERVED_NAME,
            concurrency=args.concurrency,
            requests=args.requests,
            max_tokens=args.max_tokens,
            zipf=args.zipf,
            warmup=0,
            seed=0,
            progress=False,
            endpoint=args.endpoint,
            ignore_eos=args.ignore_eos,
        )
        hits, misses = cache_counts(targets)
    hits, misses = hits - hits0, misses - misses0
    latency = report["latency_ms"]["ttft"]
    return {
        "routing": "affinity" if affinity else "spread",
        "cache_hits": hits,
        "cache_misses": misses,
        "cache_hit_ratio": ratio(hits, hits + misses),
        "ttft_p50_ms": latency["p50"],
        "ttft_p99_ms": latency["p99"],
        "output_tokens_per_s": report["throughput"]["output_tokens_per_s"],
        "success_rate": report["requests"]["success_rate"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--max-cpu-loras", type=int, default=8)
    add_workload_options(parser)
    args = parser.parse_args()
    engine = Engine(
        base=base_model_dir(),
        dtype=args.dtype,
        fast_lora=args.fast_lora,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        max_num_seqs=max(8, args.concurrency),
        max_model_len=512,
    )
    folder = make_adapters(engine.base, args.adapters, 8, ["q_proj", "v_proj"])
    points = [run(engine, folder, affinity, args) for affinity in (True, False)]
    for point in points:
        print(point, flush=True)
    path = write_result(
        "ray_affinity",
        {
            "description": "adapter-affinity routing vs spreading on two Ray Serve replicas",
            "engine": engine.describe(),
            "workload": vars(args),
            "points": points,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
