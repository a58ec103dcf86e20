"""Gateway overhead: loraplex vs vLLM's own OpenAI server, same engine, adapters, workload.

Starts each server in turn (never both at once), sends the same seeded workload (Zipf
popularity over the same random adapters, streamed), and reports loraplex / vLLM ratios of
throughput and of p50/p99 TTFT and end-to-end latency. ``--rounds 2`` alternates the order
(vLLM, loraplex, loraplex, vLLM) to cancel drift on a noisy machine. Writes
``bench/results/gateway_overhead.json`` + ``.png`` and the table in ``bench/README.md``.

    .venv/bin/python -m bench.gateway_overhead            # ~3-5 min on 2 cores
    .venv/bin/python -m bench.gateway_overhead --requests 256 --concurrency 16 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from bench._common import (
    RESULTS,
    SCRATCH,
    Engine,
    adapter_paths,
    add_workload_options,
    base_model_dir,
    loraplex_server,
    machine_line,
    make_adapters,
    measure,
    ratio,
    update_readme,
    vllm_server,
    write_result,
)

KEYS = {
    "output_tokens_per_s": ("throughput", "output_tokens_per_s"),
    "requests_per_s": ("throughput", "requests_per_s"),
    "ttft_p50_ms": ("latency_ms", "ttft", "p50"),
    "ttft_p99_ms": ("latency_ms", "ttft", "p99"),
    "e2e_p50_ms": ("latency_ms", "e2e", "p50"),
    "e2e_p99_ms": ("latency_ms", "e2e", "p99"),
    "success_rate": ("requests", "success_rate"),
    "output_tokens": ("tokens", "output"),
}


def _pick(report: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        report = report[key]
    return report


def _median(reports: list[dict[str, Any]]) -> dict[str, float | None]:
    out = {}
    for name, path in KEYS.items():
        values = [v for v in (_pick(r, path) for r in reports) if v is not None]
        out[name] = round(statistics.median(values), 3) if values else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=8, help="distinct adapters in use")
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds per server")
    add_workload_options(parser)
    args = parser.parse_args()

    engine = Engine(
        base=base_model_dir(),
        dtype=args.dtype,
        fast_lora=args.fast_lora,
        max_lora_rank=max(16, args.rank),
    )
    folder = make_adapters(engine.base, args.adapters, args.rank, args.targets.split(","))
    adapters = adapter_paths(folder, args.adapters)
    workload = {
        "concurrency": args.concurrency,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "adapter_names": [n for n, _ in adapters],
        "zipf": args.zipf,
        "warmup": args.warmup,
        "seed": 0,
        "progress": False,
        "endpoint": args.endpoint,
        "ignore_eos": args.ignore_eos,
    }
    order = ["vllm", "loraplex"]
    plan = [order if r % 2 == 0 else order[::-1] for r in range(args.rounds)]
    runs: dict[str, list[dict[str, Any]]] = {"vllm": [], "loraplex": []}
    for round_plan in plan:
        for name in round_plan:
            log = SCRATCH / f"gateway-{name}.log"
            started = time.monotonic()
            if name == "vllm":
                server = vllm_server(engine, adapters, log)
            else:
                server = loraplex_server(engine, folder, log)
            with server as running:
                startup = time.monotonic() - started
                report = measure(running.url, **workload)
            report["startup_s"] = round(startup, 1)
            runs[name].append(report)
            print(
                f"{name}: {report['throughput']['output_tokens_per_s']} tok/s, "
                f"TTFT p50 {report['latency_ms']['ttft']['p50']} ms",
                flush=True,
            )

    summary = {name: _median(reports) for name, reports in runs.items()}
    ratios = {k: ratio(summary["loraplex"][k], summary["vllm"][k]) for k in KEYS}
    result = {
        "description": "loraplex / vLLM OpenAI server, same engine settings, adapters, workload",
        "engine": engine.describe(),
        "adapters": {"count": args.adapters, "rank": args.rank, "targets": args.targets},
        "workload": workload,
        "rounds": args.rounds,
        "summary": summary,
        "ratio_loraplex_over_vllm": ratios,
        "runs": runs,
    }
    path = write_result("gateway_overhead", result)
    _plot(summary)
    _readme(summary, ratios, args)
    print(f"ratios loraplex/vLLM: {ratios}\nwrote {path}")


def _plot(summary: dict[str, dict[str, float | None]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "e2e_p99_ms"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(13, 3.5))
    for ax, metric in zip(axes, metrics, strict=True):
        values = [summary[s][metric] or 0 for s in ("vllm", "loraplex")]
        ax.bar(["vLLM", "loraplex"], values, color=["tab:gray", "tab:blue"])
        ax.set_title(metric)
    fig.suptitle("Gateway overhead: loraplex vs vLLM OpenAI server")
    fig.tight_layout()
    fig.savefig(RESULTS / "gateway_overhead.png", dpi=100)
    plt.close(fig)


def _readme(summary: dict, ratios: dict, args: argparse.Namespace) -> None:
    rows = ["| metric | vLLM | loraplex | loraplex / vLLM |", "|---|---:|---:|---:|"]
    for key in KEYS:
        rows.append(
            f"| {key} | {summary['vllm'][key]} | {summary['loraplex'][key]} | {ratios[key]} |"
        )
    head = (
        f"Machine: {machine_line()}. Workload: {args.requests} streamed requests, concurrency "
        f"{args.concurrency}, {args.max_tokens} max tokens, {args.adapters} adapters (rank "
        f"{args.rank}, Zipf {args.zipf}), {args.dtype}, {args.rounds} round(s). "
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
    )
    update_readme("gateway_overhead", head + "\n\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
