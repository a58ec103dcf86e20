"""Adapter scaling: throughput and p99 with 1, 8, 32, 128 distinct adapters vs the base alone.

Makes random rank-r PEFT adapters, starts one ``loraplex serve`` (engine slots ``max_loras``,
CPU cache ``max_cpu_loras``), then runs the same seeded streamed workload with requests
spread over N adapters (Zipf popularity) for each N, and over the base model alone (N=0).
Before each N, every one of its adapters gets one short request, so both servers start the
measured part with them loaded: vLLM's own server loads its ``--lora-modules`` at start, and
what a first load costs is ``hot_swap``'s measure, not this one's.
Reports each N's throughput and p99 as ratios to the base model's, and the adapter cache hit
ratio from ``/metrics``. ``--rounds`` repeats base and every N in turn, and the base model
runs once more at the end; each N's best round is compared with the base's best (as
``lora_step`` does), and ``base_drift`` (last base / first base) says how much the machine
itself drifted during the run. Writes ``bench/results/adapter_scaling.json`` +
``.png`` and the table in ``bench/README.md``. Small defaults run in a few minutes on 2 cores.

    .venv/bin/python -m bench.adapter_scaling
    .venv/bin/python -m bench.adapter_scaling --counts 1,8,32,128,512 --requests 512 \\
        --concurrency 32 --max-tokens 128 --rank 16 --targets all-linear
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import httpx

from bench._common import (
    RESULTS,
    SCRATCH,
    SERVED_NAME,
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
from loraplex.adapters import LINEAR_PROJECTIONS


def _points(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each N's best round (highest throughput) as a point, with ratios to the base's best;
    the base's point also gets ``base_drift``, its last round's throughput over its first's.
    TTFT p50 also as the median over every round of each N, and its ratio to the base's
    (``ttft_p50_median_*``): one round's TTFT p50 moves by 10-20% run to run here, so the
    best-throughput round's is no estimate of it. And paired (``ttft_p50_paired_vs_base``):
    the median over rounds of each round's TTFT p50 over the mean of the base runs just
    before and after it, so that the machine's drift during the run cancels out."""
    best = {n: max(reports, key=_throughput) for n, reports in runs.items()}
    base = _point(best["0"], None)
    points = {n: _point(report, base) for n, report in best.items()}
    points["0"]["base_drift"] = ratio(_throughput(runs["0"][-1]), _throughput(runs["0"][0]))
    ttft = {
        n: statistics.median(r["latency_ms"]["ttft"]["p50"] for r in rs) for n, rs in runs.items()
    }
    for n, point in points.items():
        point["ttft_p50_median_ms"] = round(ttft[n], 1)
        point["ttft_p50_median_vs_base"] = ratio(ttft[n], ttft["0"])
    base_ttft = [r["latency_ms"]["ttft"]["p50"] for r in runs["0"]]
    for n, point in points.items():
        if n != "0" and len(base_ttft) > len(runs[n]):
            paired = [
                r["latency_ms"]["ttft"]["p50"] / ((base_ttft[i] + base_ttft[i + 1]) / 2)
                for i, r in enumerate(runs[n])
            ]
            point["ttft_p50_paired_vs_base"] = round(statistics.median(paired), 3)
    return points


def _throughput(report: dict[str, Any]) -> float:
    return report["throughput"]["output_tokens_per_s"] or 0.0


def _point(report: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    thr, lat = report["throughput"], report["latency_ms"]
    point = {
        "output_tokens_per_s": thr["output_tokens_per_s"],
        "requests_per_s": thr["requests_per_s"],
        "ttft_p50_ms": lat["ttft"]["p50"],
        "ttft_p99_ms": lat["ttft"]["p99"],
        "e2e_p99_ms": lat["e2e"]["p99"],
        "success_rate": report["requests"]["success_rate"],
        "cache_hit_ratio": report["adapter_cache"]["hit_ratio"],
    }
    if base is not None:
        point["throughput_vs_base"] = ratio(
            point["output_tokens_per_s"], base["output_tokens_per_s"]
        )
        point["e2e_p99_vs_base"] = ratio(point["e2e_p99_ms"], base["e2e_p99_ms"])
    return point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1,8,32,128", help="adapter counts to measure")
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="times base and each N are run")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,v_proj", help="or all-linear")
    parser.add_argument("--max-loras", type=int, default=8)
    parser.add_argument("--max-cpu-loras", type=int, default=32)
    add_workload_options(parser)
    parser.add_argument("--server", choices=["loraplex", "vllm"], default="loraplex")
    parser.add_argument(
        "--merge-hot",
        action="store_true",
        help="loraplex with merge_hot on (an adapter carrying most tokens is merged into the "
        "base weights); results and README table of their own",
    )
    args = parser.parse_args()
    if args.merge_hot and args.server != "loraplex":
        parser.error("--merge-hot is a loraplex setting")

    counts = sorted({int(c) for c in args.counts.split(",")})
    targets = list(LINEAR_PROJECTIONS) if args.targets == "all-linear" else args.targets.split(",")
    engine = Engine(
        base=base_model_dir(),
        dtype=args.dtype,
        fast_lora=args.fast_lora,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        max_lora_rank=max(16, args.rank),
    )
    started = time.monotonic()
    folder = make_adapters(engine.base, max(counts), args.rank, targets)
    print(f"adapters ready in {time.monotonic() - started:.0f}s: {folder}", flush=True)
    names = [n for n, _ in adapter_paths(folder, max(counts))]
    common = {
        "concurrency": args.concurrency,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "zipf": args.zipf,
        "warmup": args.warmup,
        "seed": 0,
        "progress": False,
        "endpoint": args.endpoint,
        "ignore_eos": args.ignore_eos,
    }
    log = SCRATCH / f"scaling-{args.server}.log"
    server = (
        loraplex_server(
            engine, folder, log, {"LORAPLEX_MERGE_HOT": "on"} if args.merge_hot else None
        )
        if args.server == "loraplex"
        else vllm_server(engine, adapter_paths(folder, max(counts)), log)
    )
    runs: dict[str, list[dict[str, Any]]] = {str(n): [] for n in [0, *counts]}
    with server as running:
        for n in [0, *counts] * args.rounds + [0]:
            _load(running.url, names[:n])
            report = measure(
                running.url, adapter_names=names[:n], adapters=n, base_model=SERVED_NAME, **common
            )
            runs[str(n)].append(report)
            print(f"{n:>4} adapters: {_point(report, None)}", flush=True)
    points = _points(runs)
    print(f"best rounds (base drift {points['0']['base_drift']}):")
    for n, point in points.items():
        print(
            f"{n:>4} adapters: x{point.get('throughput_vs_base', 1.0)}, TTFT p50 median of "
            f"rounds {point['ttft_p50_median_ms']} (x{point['ttft_p50_median_vs_base']}; "
            f"paired x{point.get('ttft_p50_paired_vs_base', 1.0)})"
        )
    result = {
        "description": "throughput and p99 with N distinct adapters vs the base model alone",
        "server": args.server,
        "engine": engine.describe(),
        "adapters": {"rank": args.rank, "targets": targets, "zipf": args.zipf},
        "workload": common,
        "rounds": args.rounds,
        "points": points,
        "runs": runs,
    }
    name = _name(args)
    path = write_result(name, result)
    _plot(points, name)
    _readme(points, args, targets)
    print(f"wrote {path}")


def _load(url: str, names: list[str]) -> None:
    """One one-token request per adapter, in turn (not measured)."""
    with httpx.Client(base_url=url, timeout=300) as client:
        for name in names:
            body = {"model": name, "prompt": "Hello", "max_tokens": 1}
            client.post("/v1/completions", json=body).raise_for_status()


def _plot(points: dict[str, dict[str, Any]], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["base" if n == "0" else n for n in points]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].bar(labels, [p["output_tokens_per_s"] or 0 for p in points.values()])
    axes[0].set_ylabel("output tokens / s")
    axes[1].bar(labels, [p["e2e_p99_ms"] or 0 for p in points.values()], color="tab:orange")
    axes[1].set_ylabel("p99 end-to-end ms")
    for ax in axes:
        ax.set_xlabel("distinct adapters")
    fig.suptitle("Adapter scaling (same engine, same workload)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=100)
    plt.close(fig)


def _readme(points: dict, args: argparse.Namespace, targets: list[str]) -> None:
    rows = [
        "| adapters | output tok/s | vs base | TTFT p50 ms (median of rounds) | vs base "
        "| paired | TTFT p99 ms | e2e p99 ms | p99 vs base | cache hit ratio | success |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, p in points.items():
        rows.append(
            f"| {'base' if n == '0' else n} | {p['output_tokens_per_s']} "
            f"| {p.get('throughput_vs_base', 1.0)} | {p['ttft_p50_median_ms']} "
            f"| {p['ttft_p50_median_vs_base']} | {p.get('ttft_p50_paired_vs_base', 1.0)} "
            f"| {p['ttft_p99_ms']} | {p['e2e_p99_ms']} "
            f"| {p.get('e2e_p99_vs_base', 1.0)} | {p['cache_hit_ratio']} | {p['success_rate']} |"
        )
    head = (
        f"Machine: {machine_line()}. Server: {args.server}"
        f"{' (merge_hot on)' if args.merge_hot else ''}. Workload per point: "
        f"{args.requests} streamed requests, concurrency {args.concurrency}, {args.max_tokens} "
        f"max tokens, Zipf {args.zipf}; adapters rank {args.rank} on {','.join(targets)}; "
        f"max_loras {args.max_loras}, max_cpu_loras {args.max_cpu_loras}, {args.dtype}. "
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Best of {args.rounds} "
        f"round(s) per row, TTFT p50 the median of the rounds (the base: of {args.rounds + 1}, "
        f"its last / first throughput {points['0']['base_drift']}); paired: the median of "
        f"each round's TTFT p50 over the mean of the base runs before and after it."
    )
    section = f"adapter_scaling_{args.server}{'_merge_hot' if args.merge_hot else ''}"
    update_readme(section, head + "\n\n" + "\n".join(rows))


def _name(args: argparse.Namespace) -> str:
    """The results file's name: ``adapter_scaling`` for loraplex, with ``_vllm`` for vLLM's
    server or ``_merge_hot`` for loraplex with merge_hot on."""
    suffix = "_vllm" if args.server == "vllm" else "_merge_hot" if args.merge_hot else ""
    return f"adapter_scaling{suffix}"


if __name__ == "__main__":
    main()
