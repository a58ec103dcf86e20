"""LoRA cost per engine step, in one process: base vs 1, 8 and 32 adapters on one vLLM engine.

One ``vllm.LLM`` (engine in this process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with LoRA on,
the fast-LoRA plugin as configured (``LORAPLEX_FAST_LORA``), runs the same batch of random
prompts (``--requests``, ``--max-tokens``, ignore-eos, greedy) for the base model and for N
distinct adapters (round robin), modes interleaved for ``--rounds`` to cancel drift. Reports
each mode's best wall time and its throughput ratio to base, from the same run. No server, no
HTTP: only the engine step, so it isolates what the LoRA ops cost. ``--profile`` adds a
torch.profiler table (top ops by self CPU time) of one extra run of ``--profile-mode``.

    .venv/bin/python -m bench.lora_step --dtype float32
    .venv/bin/python -m bench.lora_step --modes 8 --rounds 1 --profile --eager
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from bench._common import SCRATCH, adapter_paths, base_model_dir, make_adapters, write_result
from loraplex.adapters import LINEAR_PROJECTIONS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--modes", default="1,8,32", help="adapter counts (base always runs)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8, help="max_num_seqs")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,v_proj", help="or all-linear")
    parser.add_argument("--max-loras", type=int, default=8)
    parser.add_argument(
        "--max-lora-rank",
        type=int,
        default=16,
        help="the engine's slot rank (loraplex serves with 64 by default); adapters of a "
        "lower --rank are padded into it",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--eager", action="store_true", help="--enforce-eager (no compile)")
    parser.add_argument(
        "--stagger",
        action="store_true",
        help="vary each request's length (0.5x to 1.5x --max-tokens, seeded) so that requests "
        "finish and join one at a time, as a server's closed-loop clients do: the batch's "
        "adapter mapping then changes every few steps and prefills mix with decodes",
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-mode", type=int, default=8)
    parser.add_argument("--out", default="lora_step")
    args = parser.parse_args()

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    counts = [int(c) for c in args.modes.split(",")]
    targets = list(LINEAR_PROJECTIONS) if args.targets == "all-linear" else args.targets.split(",")
    base = base_model_dir()
    folder = make_adapters(base, max(counts), args.rank, targets)
    loras = [
        LoRARequest(name, i + 1, str(path))
        for i, (name, path) in enumerate(adapter_paths(folder, max(counts)))
    ]
    llm = LLM(
        model=str(base),
        dtype=args.dtype,
        max_model_len=1024,
        enable_lora=True,
        max_loras=args.max_loras,
        max_cpu_loras=max(counts),
        max_lora_rank=max(args.max_lora_rank, args.rank),
        max_num_seqs=args.concurrency,
        enforce_eager=args.eager,
        seed=0,
    )
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (args.requests, args.prompt_tokens), generator=gen)
    prompts = [{"prompt_token_ids": row} for row in ids.tolist()]
    lengths = [args.max_tokens] * args.requests
    if args.stagger:
        low, high = max(1, args.max_tokens // 2), args.max_tokens * 3 // 2
        lengths = torch.randint(low, high + 1, (args.requests,), generator=gen).tolist()
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]

    def run(n: int) -> float:
        lora = [loras[i % n] for i in range(args.requests)] if n else None
        started = time.perf_counter()
        llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        return time.perf_counter() - started

    for n in [0, *counts]:  # warm up: compile sizes, load every adapter once
        run(n)
    times: dict[int, list[float]] = {n: [] for n in [0, *counts]}
    for _ in range(args.rounds):
        for n in times:
            times[n].append(run(n))
    best = {n: min(t) for n, t in times.items()}
    result: dict[str, Any] = {
        "settings": vars(args),
        "seconds": times,
        "vs_base": {n: round(best[0] / best[n], 3) for n in best},
    }
    for n in best:
        label = "base" if n == 0 else f"{n} adapters"
        print(f"{label:12} best {best[n]:7.2f} s   x base {best[0] / best[n]:.3f}", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(args.profile_mode)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        print(table)
        (SCRATCH / f"{args.out}-profile.txt").write_text(table)
    print(f"wrote {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
