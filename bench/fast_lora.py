"""Fast CPU LoRA (loraplex's vLLM plugin) vs vLLM's stock CPU LoRA ops vs the base model.

Starts vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``) three
ways, one at a time, same engine settings:

- base: no ``--enable-lora``;
- stock: ``--enable-lora`` with ``LORAPLEX_FAST_LORA=off`` (vLLM's torch ops, eager);
- fast: ``--enable-lora`` with ``LORAPLEX_FAST_LORA=on`` (loraplex's ops, compiled model);

and drives each with vLLM's own benchmark client (``vllm.benchmarks.serve``, backend openai,
random dataset, 128 input / 64 output tokens, ``--ignore-eos``, max concurrency 8), for the
base model and for 1 and 8 adapters (``--lora-assignment round-robin``). Prints throughput,
median TTFT and ITL, and their ratios to base measured in the same run (the machine is
shared and noisy: compare ratios, not absolute numbers). Writes ``bench/results/fast_lora.json``.

    .venv/bin/python -m bench.fast_lora                 # 64 prompts per run, ~10 min on 2 cores
    .venv/bin/python -m bench.fast_lora --prompts 32 --skip-stock --eager
    .venv/bin/python -m bench.fast_lora --profile      # + py-spy shares of the worker's step
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench._common import (
    SCRATCH,
    SERVED_NAME,
    Engine,
    adapter_paths,
    base_model_dir,
    make_adapters,
    ratio,
    vllm_server,
    write_result,
)
from loraplex.adapters import LINEAR_PROJECTIONS


def run_client(url: str, base: Path, args, loras: list[str], out: Path) -> dict[str, Any]:
    """One ``vllm bench serve`` run (through its module: the console script fails here)."""
    argv = [
        "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
        "--model", SERVED_NAME, "--tokenizer", str(base),
        "--dataset-name", "random", "--random-input-len", "128", "--random-output-len", "64",
        "--num-prompts", str(args.prompts), "--max-concurrency", "8", "--ignore-eos",
        "--seed", "0", "--disable-tqdm", "--percentile-metrics", "ttft,itl,e2el",
        "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
    ]  # fmt: skip
    if loras:
        argv += ["--lora-modules", *loras, "--lora-assignment", "round-robin"]
    code = (
        "import sys\n"
        "from vllm.benchmarks.serve import add_cli_args, main\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "parser = FlexibleArgumentParser()\n"
        "add_cli_args(parser)\n"
        "main(parser.parse_args(sys.argv[1:]))\n"
    )
    subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True)
    data = json.loads(out.read_text())
    return {
        "req_s": round(data["request_throughput"], 3),
        "ttft_ms": round(data["median_ttft_ms"], 1),
        "itl_ms": round(data["median_itl_ms"], 1),
        "failed": data.get("failed", 0),
    }


def serve_and_measure(name, engine, args, adapters, workloads, extra=()) -> dict[str, Any]:
    log = SCRATCH / f"fast_lora-{name}.log"
    server = vllm_server(
        engine, adapters, log, enable_lora=bool(adapters), extra=extra, timeout=1200
    )
    results = {}
    with server as srv:
        results["startup_s"] = round(srv.startup_seconds or 0, 1)
        for workload, loras in workloads.items():
            out = SCRATCH / f"fast_lora-{name}-{workload}.json"
            stem = f"fast_lora-{name}-{workload.replace(' ', '_')}"
            with profiled(srv.process.pid, SCRATCH / f"{stem}.pyspy", args.profile) as profile:
                results[workload] = run_client(srv.url, engine.base, args, loras, out)
            if profile.exists():
                results[workload]["profile"] = time_shares(profile)
            print(name, workload, results[workload], flush=True)
    return results


@contextlib.contextmanager
def profiled(pid: int, out: Path, enabled: bool) -> Iterator[Path]:
    """py-spy samples the server and its workers while the block runs (when enabled)."""
    out.unlink(missing_ok=True)
    if not enabled:
        yield out
        return
    spy = Path(sys.executable).with_name("py-spy")
    command = [str(spy), "record", "--pid", str(pid), "--subprocesses", "--rate", "50"]
    command += ["--format", "raw", "--output", str(out), "--nonblocking"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield out
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)


#: Where a worker's model step spends its time: first matching frame text wins, per sample.
SHARES = [
    ("lora ops (loraplex)", "loraplex/fastlora"),
    ("lora ops (vLLM stock)", "lora/ops/torch_ops"),
    ("base linear (oneDNN)", "onednn_mm"),
    ("attention", "attention"),
]


def time_shares(raw: Path) -> dict[str, float]:
    """Share of the worker's ``execute_model`` samples by part (see SHARES)."""
    counts: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if "execute_model" not in stack or not n.isdigit():
            continue
        total += int(n)
        in_model = "_model_forward" in stack
        part = next((k for k, key in SHARES if key in stack), None)
        part = part or ("rest of model forward" if in_model else "step outside the model")
        counts[part] = counts.get(part, 0) + int(n)
    return {k: round(v / total, 3) for k, v in sorted(counts.items())} if total else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64, help="prompts per run")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--skip-stock", action="store_true", help="skip vLLM's stock LoRA ops")
    parser.add_argument(
        "--eager", action="store_true", help="also run fast ops with --enforce-eager (no compile)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the servers: where the step time goes"
    )
    args = parser.parse_args()

    base = base_model_dir()
    adapters = adapter_paths(make_adapters(base, 8, args.rank, list(LINEAR_PROJECTIONS)), 8)
    names = [name for name, _ in adapters]
    workloads = {"1 adapter": names[:1], "8 adapters": names}
    engine = Engine(base, args.dtype, max_model_len=1024, max_num_seqs=16, max_lora_rank=args.rank)
    runs = {"base": serve_and_measure("base", engine, args, [], {"base": []})}
    modes = {"fast": ("on", [])}
    if args.eager:
        modes["fast-eager"] = ("on", ["--enforce-eager"])
    if not args.skip_stock:
        modes["stock"] = ("off", [])
    for mode, (switch, extra) in modes.items():
        mode_engine = dataclasses.replace(engine, fast_lora=switch)
        runs[mode] = serve_and_measure(mode, mode_engine, args, adapters, workloads, extra)

    ref = runs["base"]["base"]
    table = []
    print(f"\n{'run':24} {'req/s':>7} {'TTFT ms':>8} {'ITL ms':>7}   x base: req/s TTFT ITL")
    for mode, results in runs.items():
        for workload, m in results.items():
            if workload == "startup_s":
                continue
            row = {
                "run": f"{mode} / {workload}",
                **m,
                "req_s_ratio": ratio(m["req_s"], ref["req_s"]),
                "ttft_ratio": ratio(m["ttft_ms"], ref["ttft_ms"]),
                "itl_ratio": ratio(m["itl_ms"], ref["itl_ms"]),
            }
            table.append(row)
            print(
                f"{row['run']:24} {m['req_s']:7.2f} {m['ttft_ms']:8.0f} {m['itl_ms']:7.1f}"
                f"   {row['req_s_ratio']:.2f}x {row['ttft_ratio']:.2f}x {row['itl_ratio']:.2f}x"
            )
    settings = {"prompts": args.prompts, "dtype": args.dtype, "rank": args.rank}
    path = write_result("fast_lora", {"settings": settings, "runs": runs, "table": table})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
