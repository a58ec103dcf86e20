"""Where vLLM runs the model on CPU: ``--cpu-worker inline`` (loraplex's default) vs ``process``.

``process`` is vLLM's own CPU layout: a worker process for the model, bound to every core but
one, which is kept for the engine core's scheduler loop. ``inline`` runs the model in the
engine core's process on all ``OMP_NUM_THREADS`` threads. For each round this starts
``loraplex serve`` once per layout (the order alternates between rounds, against drift),
warms it up, and measures output tokens/s and TTFT p50 on the base model and on 8 rank-16
adapters (all linear layers, round-robin), with vLLM's ``ignore_eos`` for fixed lengths.
Prints each round's inline/process ratios and writes ``bench/results/cpu_worker.json``.
About 5 minutes per round on 2 cores; run it alone.

    .venv/bin/python -m bench.cpu_worker --rounds 2
"""

from __future__ import annotations

import argparse
from typing import Any

from bench._common import (
    SCRATCH,
    Engine,
    base_model_dir,
    loraplex_server,
    make_adapters,
    measure,
    ratio,
    write_result,
)
from loraplex.adapters import LINEAR_PROJECTIONS

LAYOUTS = ("process", "inline")


def run_layout(engine: Engine, adapters: Any, layout: str, round_: int, args) -> dict[str, Any]:
    """One server in ``layout``: its start time, then base and 8-adapter throughput."""
    log = SCRATCH / f"cpu-worker-{layout}-{round_}.log"
    workload = {
        "requests": args.requests,
        "concurrency": 8,
        "max_tokens": args.max_tokens,
        "ignore_eos": True,
        "progress": False,
    }
    with loraplex_server(engine, adapters, log, {"LORAPLEX_CPU_WORKER": layout}) as server:
        measure(server.url, requests=16, concurrency=8, max_tokens=16, adapters=8, progress=False)
        points = {
            "base": measure(server.url, **workload),
            "8 adapters": measure(server.url, **workload, adapters=8, zipf=0.0),
        }
        start = server.startup_seconds
    return {
        "seconds_to_ready": round(start, 1),
        **{
            name: {
                "output_tokens_per_s": report["throughput"]["output_tokens_per_s"],
                "ttft_p50_ms": report["latency_ms"]["ttft"]["p50"],
                "success_rate": report["requests"]["success_rate"],
            }
            for name, report in points.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    base = base_model_dir()
    engine = Engine(base=base, dtype=args.dtype, max_loras=8, max_cpu_loras=32)
    adapters = make_adapters(base, 8, rank=16, targets=list(LINEAR_PROJECTIONS))
    rounds = []
    for round_ in range(args.rounds):
        order = LAYOUTS if round_ % 2 == 0 else LAYOUTS[::-1]
        runs = {layout: run_layout(engine, adapters, layout, round_, args) for layout in order}
        inline, process = runs["inline"], runs["process"]
        ratios = {
            f"{point} tokens/s": ratio(
                inline[point]["output_tokens_per_s"], process[point]["output_tokens_per_s"]
            )
            for point in ("base", "8 adapters")
        }
        ratios["seconds to ready"] = ratio(inline["seconds_to_ready"], process["seconds_to_ready"])
        rounds.append({"runs": runs, "inline_over_process": ratios})
        print(f"round {round_}: inline / process {ratios}", flush=True)
        for layout in LAYOUTS:
            print(f"  {layout}: {runs[layout]}", flush=True)
    path = write_result(
        "cpu_worker", {"engine": engine.describe(), "workload": vars(args), "rounds": rounds}
    )
    print(f"-> {path}")


if __name__ == "__main__":
    main()
