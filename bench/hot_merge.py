"""Merged hot adapter: one adapter's traffic merged into the base weights vs unmerged vs base.

One vLLM engine in this process (compiled, fast LoRA, ``merge_hot`` on) runs the same seeded
batch of prompts, in rounds: the base model alone, one adapter with merging switched off,
the same adapter with merging on (``fastlora.hot_policy`` merges it: all the traffic is its),
and a mixed batch (half the adapter, a quarter another adapter, a quarter base) with merging
off and on (the policy should leave it unmerged, at no cost). Each
round's throughputs are divided by that round's base throughput; the medians over the rounds
are reported. Writes ``bench/results/hot_merge.json`` and the table in ``bench/README.md``.

    .venv/bin/python -m bench.hot_merge --dtype float32 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from bench._common import (
    Engine,
    adapter_paths,
    base_model_dir,
    machine_line,
    make_adapters,
    update_readme,
    write_result,
)
from loraplex.adapters import LINEAR_PROJECTIONS

PROMPT = "Write a short story about a lighthouse keeper and the sea, number {}."


def _hot_merge() -> Any:
    """The engine's ``HotMerge`` (the one punica wrapper's, in this process)."""
    from loraplex.fastlora.punica import _WRAPPERS

    (wrapper,) = _WRAPPERS.values()
    return wrapper.hot_merge


def _run(llm: Any, prompts: list[str], loras: list[Any], max_tokens: int) -> float:
    """Output tokens per second of one batch."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    elapsed = time.perf_counter() - started
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="all-linear", help="or q_proj,v_proj")
    args = parser.parse_args()

    targets = list(LINEAR_PROJECTIONS) if args.targets == "all-linear" else args.targets.split(",")
    os.environ.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",  # the wrapper in this process
        VLLM_CPU_KVCACHE_SPACE="1",
        LORAPLEX_FAST_LORA="on",
        LORAPLEX_MERGE_HOT="on",
        LORAPLEX_MERGE_HOT_TOKENS="256",
    )
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    engine = Engine(base=base_model_dir(), dtype=args.dtype, max_loras=2, max_num_seqs=32)
    folder = make_adapters(engine.base, 2, args.rank, targets)
    (hot_name, hot_path), (other_name, other_path) = adapter_paths(folder, 2)
    llm = LLM(
        model=str(engine.base),
        dtype=args.dtype,
        enable_lora=True,
        max_loras=2,
        max_lora_rank=max(16, args.rank),
        max_model_len=engine.max_model_len,
        max_num_seqs=engine.max_num_seqs,
        seed=0,
    )
    hot = LoRARequest(hot_name, 1, str(hot_path))
    other = LoRARequest(other_name, 2, str(other_path))
    merge = _hot_merge()
    prompts = [PROMPT.format(i) for i in range(args.prompts)]
    quarter = args.prompts // 4
    mixed = [hot] * (args.prompts - 2 * quarter) + [other] * quarter + [None] * quarter
    cases = {
        "base": ([None] * args.prompts, False),
        "adapter, merging off": ([hot] * args.prompts, False),
        "adapter, merging on": ([hot] * args.prompts, True),
        "mixed, merging off": (mixed, False),
        "mixed, merging on": (mixed, True),
    }
    _run(llm, prompts, mixed, args.max_tokens)  # warm-up: compile, load both adapters
    ratios: dict[str, list[float]] = {name: [] for name in cases}
    rates: dict[str, list[float]] = {name: [] for name in cases}
    ended_merged: dict[str, list[bool]] = {name: [] for name in cases}
    for round_ in range(args.rounds):
        for name, (loras, merging) in cases.items():
            merge.set_enabled(merging)
            _run(llm, prompts, loras, 1)  # merged or unmerged before the clock starts
            for _ in range(100 if merging and name.startswith("adapter") else 0):
                if merge.lora_id is not None:
                    break
                _run(llm, prompts, loras, 4)  # a merge is packed over a few dozen steps
            events = len(merge.events)
            rates[name].append(_run(llm, prompts, loras, args.max_tokens))
            ended_merged[name].append(merge.lora_id is not None)
            if len(merge.events) != events:
                print(f"  {name}: switched during the run: {merge.events[events:]}")
        base = rates["base"][-1]
        for name in cases:
            ratios[name].append(rates[name][-1] / base)
        print(
            f"round {round_ + 1}/{args.rounds}: "
            + ", ".join(f"{n} {rates[n][-1]:.0f} tok/s ({ratios[n][-1]:.3f}x)" for n in cases),
            flush=True,
        )
    summary = {
        name: {
            "output_tokens_per_s_median": round(statistics.median(rates[name]), 1),
            "vs_base_median": round(statistics.median(ratios[name]), 3),
            "vs_base_per_round": [round(r, 3) for r in ratios[name]],
            "ended_merged": all(ended_merged[name]),
        }
        for name in cases
    }
    result = {
        "description": "one adapter's traffic merged into the base weights vs unmerged vs base",
        "engine": {"dtype": args.dtype, "max_loras": 2, "compiled": True},
        "adapters": {"rank": args.rank, "targets": targets},
        "workload": {"prompts": args.prompts, "max_tokens": args.max_tokens},
        "rounds": args.rounds,
        "cases": summary,
        "merge_events": merge.events,
    }
    path = write_result("hot_merge", result)
    rows = ["| traffic | output tok/s (median) | vs base (median of rounds) | ended merged |"]
    rows.append("|---|---:|---:|---|")
    for name, point in summary.items():
        rows.append(
            f"| {name} | {point['output_tokens_per_s_median']} | {point['vs_base_median']} "
            f"| {'yes' if point['ended_merged'] else 'no'} |"
        )
    head = (
        f"Machine: {machine_line()}. One in-process engine, compiled, {args.dtype}; "
        f"{args.prompts} prompts x {args.max_tokens} tokens per batch; adapters rank "
        f"{args.rank} on {','.join(targets)}; {args.rounds} rounds. "
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
    )
    update_readme("hot_merge", head + "\n\n" + "\n".join(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
