"""bf16 vs fp32 on CPU: is an adapter's greedy output independent of its batch, and at what speed?

Three parts, each engine run in its own process (vLLM in-process, eager, fast LoRA on, the
bench engine settings):

1. GEMMs: the bundled model's projection shapes through vLLM's oneDNN linear (the path its
   CPU layers use), random inputs: for each M (rows in the step), whether row 0 comes out
   bit-identical to the same row computed alone (M=1).
2. Greedy output alone vs batched: 16 requests on 4 adapters (48 tokens), each run alone and
   then all together with 8 longer fillers; how many of the 16 completions change (token
   ids), per dtype: as vLLM runs the linear layers (``none``: loraplex's general plugin off),
   with one-row inputs padded with a zero row (``single``), and as loraplex serves them
   (``loraplex``: ``fastlora.row_invariance`` gives 16-bit layers one zero row more, always;
   fp32 layers are left as they are), so oneDNN's one-row kernel is never used.
3. Throughput: 64 requests x 64 tokens on 8 adapters round-robin, per dtype.

    .venv/bin/python -m bench.batch_invariance          # ~9 min on 2 cores (quiet)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._common import Engine, adapter_paths, base_model_dir, make_adapters, write_result

ROWS = (1, 2, 3, 4, 8, 16, 64, 256)
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "def fibonacci(n):",
    "The three primary colours are",
    "In 1969, the first person to walk on the moon",
    "A recipe for bread starts with",
    "The mitochondria is",
    "Once upon a time, in a small village,",
    "The best way to learn a language is",
    "SELECT name FROM users WHERE",
    "Photosynthesis converts",
    "The stock market fell today because",
    "My favourite season is autumn, since",
    "To install the package, run",
    "The speed of light is",
    "Dear customer, thank you for",
]
FILLERS = [f"Tell me everything about topic number {i}, in detail, step by step." for i in range(8)]


def gemm_rows(dtype_name: str) -> list[dict[str, Any]] | dict[str, str]:
    """Part 1: which row counts change row 0's bits, per projection shape; where oneDNN
    cannot multiply ``dtype_name`` on this CPU, why."""
    import torch
    from transformers import AutoConfig
    from vllm import _custom_ops as ops

    config = AutoConfig.from_pretrained(base_model_dir())
    hidden, inner = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * hidden // config.num_attention_heads
    shapes = {
        "q/o_proj": (hidden, hidden),
        "k/v_proj": (hidden, kv),
        "gate_up_proj": (hidden, 2 * inner),
        "down_proj": (inner, hidden),
        "lm_head": (hidden, config.vocab_size),
    }
    dtype = getattr(torch, dtype_name)
    try:
        ops.create_onednn_mm(torch.ones(16, 16, dtype=dtype), 32)
    except RuntimeError as exc:  # bf16 on a CPU without AVX-512: vLLM's layers use torch there
        return {"onednn_unsupported": str(exc).splitlines()[0]}
    out = []
    for name, (k, n) in shapes.items():
        torch.manual_seed(0)
        worst = 0.0
        vs_alone: dict[int, int] = dict.fromkeys(ROWS[1:], 0)
        vs_two: dict[int, int] = dict.fromkeys(ROWS[2:], 0)
        for _ in range(20):  # 20 random weights and inputs: rounding flips are data-dependent
            handler = ops.create_onednn_mm(torch.randn(k, n, dtype=dtype), 32)
            x = torch.randn(max(ROWS), k, dtype=dtype)
            row0 = {r: ops.onednn_mm(handler, x[:r].contiguous(), None)[0] for r in ROWS}
            for rows in ROWS[1:]:
                if not torch.equal(row0[rows], row0[1]):
                    vs_alone[rows] += 1
                    worst = max(worst, (row0[rows].float() - row0[1].float()).abs().max().item())
                if rows > 2 and not torch.equal(row0[rows], row0[2]):
                    vs_two[rows] += 1
        out.append(
            {
                "layer": name,
                "K": k,
                "N": n,
                "trials_row0_differs_from_alone_by_rows": vs_alone,
                "trials_row0_differs_from_two_rows_by_rows": vs_two,
                "max_abs_diff_from_alone": worst,
            }
        )
    return out


def pad_single_rows() -> None:
    """Make every oneDNN linear that vLLM builds pad a one-row input with a zero row
    (``row_invariance.padded``, but only where the step has one row)."""
    import torch
    from vllm.model_executor.layers import utils

    from loraplex.fastlora.row_invariance import padded

    original = utils.dispatch_cpu_unquantized_gemm

    def dispatch(layer: Any, remove_weight: bool) -> None:
        original(layer, remove_weight)
        linear = layer.cpu_linear
        two_rows = padded(linear)

        def single_padded(x: torch.Tensor, weight: Any, bias: Any) -> torch.Tensor:
            return (two_rows if x.shape[0] == 1 else linear)(x, weight, bias)

        layer.cpu_linear = single_padded

    utils.dispatch_cpu_unquantized_gemm = dispatch


def engine_run(dtype: str, pad: str, folder: Path) -> dict[str, Any]:
    """Parts 2 and 3 for one dtype (and padding variant), in this process."""
    engine = Engine(base_model_dir(), dtype=dtype)
    if pad == "single":
        pad_single_rows()
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    llm = engine.in_process_llm()
    loras = [
        LoRARequest(name, i + 1, str(path))
        for i, (name, path) in enumerate(adapter_paths(folder, 8))
    ]
    greedy = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    alone = [
        llm.generate([p], greedy, lora_request=loras[i % 4], use_tqdm=False)[0]
        for i, p in enumerate(PROMPTS)
    ]
    batch = PROMPTS + FILLERS
    batch_loras = [loras[i % 4] for i in range(len(PROMPTS))] + loras[:8]
    together = llm.generate(batch, greedy, lora_request=batch_loras, use_tqdm=False)
    changed = [
        i
        for i, (a, t) in enumerate(zip(alone, together, strict=False))
        if list(a.outputs[0].token_ids) != list(t.outputs[0].token_ids)
    ]
    load = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    prompts = [PROMPTS[i % 8] + f" ({i})" for i in range(64)]
    llm.generate(prompts[:8], load, lora_request=loras, use_tqdm=False)  # warm every slot
    started = time.perf_counter()
    llm.generate(prompts, load, lora_request=[loras[i % 8] for i in range(64)], use_tqdm=False)
    seconds = time.perf_counter() - started
    return {
        "dtype": dtype,
        "pad_rows": pad,
        "completions_changed_by_batching": len(changed),
        "of": len(PROMPTS),
        "changed": changed,
        "tokens_per_s": round(64 * 64 / seconds, 1),
    }


def child(args: argparse.Namespace) -> None:
    folder = Path(args.adapters)
    if args.part == "gemm":
        result: Any = gemm_rows(args.dtype)
    else:
        result = engine_run(args.dtype, args.pad, folder)
    print("RESULT " + json.dumps(result))


def run_child(*extra: str) -> Any:
    """One part in a fresh process (vLLM's engine does not leave a process clean)."""
    command = [sys.executable, "-m", "bench.batch_invariance", "--child", *extra]
    print("running", " ".join(extra), flush=True)
    env = dict(os.environ)
    if "loraplex" not in extra:  # only the platform plugin: no row_invariance
        env["VLLM_PLUGINS"] = "loraplex_fast_lora"
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{' '.join(extra)} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=["gemm", "engine"], help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--pad", choices=["none", "single", "loraplex"], help=argparse.SUPPRESS)
    parser.add_argument("--adapters", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    folder = make_adapters(base_model_dir(), 8, 16, ["q_proj", "v_proj"])
    common = ["--adapters", str(folder)]
    result: dict[str, Any] = {"gemm": {}, "engine": []}
    for dtype in ("bfloat16", "float32"):
        result["gemm"][dtype] = run_child("--part", "gemm", "--dtype", dtype, *common)
    for dtype in ("bfloat16", "float32"):
        for pad in ("none", "single", "loraplex"):
            flags = ["--part", "engine", "--dtype", dtype, "--pad", pad, *common]
            result["engine"].append(run_child(*flags))
    result["load_average_after"] = Path("/proc/loadavg").read_text().split()[:3]
    path = write_result("batch_invariance", result)
    print(path.read_text())


if __name__ == "__main__":
    main()
