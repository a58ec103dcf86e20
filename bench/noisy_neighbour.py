"""Noisy neighbour: a quiet tenant's latency while another tenant floods, fair admission on/off.

One server per mode, auth on, base model only, tenants and keys made in a scratch
``LORAPLEX_HOME`` before it starts. Modes: ``fair`` (loraplex's weighted fair admission: at
most ``max_num_seqs`` sequences in the engine, the rest in per-tenant queues, a light
tenant's unused share of seats left free: ``LORAPLEX_LEND_SEQUENCES=0``), ``lend`` (the
server's default: the same, but the flood borrows up to ``--lend-sequences`` seats of the
quiet tenant's unused share, a quarter of the seats by default; the quiet tenant's requests
take them back first), ``fifo`` (``LORAPLEX_MAX_ENGINE_SEQUENCES=100000``: every request
goes straight to vLLM's first-come scheduler) and, with ``--vllm``, vLLM's own server (no
tenants: the two loads differ only client-side). In each server, in one run:

1. quiet alone: ``--quiet-requests`` sequential requests of ``--quiet-tokens`` -> p50/p99;
2. for each flood size N of ``--floods``: the flood alone (N concurrent streams of
   ``--flood-tokens``, each replaced when it ends, for ``--flood-seconds`` once the engine is
   full) -> tokens/s; then flood and quiet at once (the quiet tenant sends at least
   ``--quiet-requests``, and goes on until ``--flood-seconds`` have passed) -> the quiet
   p50/p99 and the flood's tokens/s, as ratios to alone;
3. weights: tenants of weight 2 and 1, ``--weight-streams`` streams each, at once -> the
   ratio of their tokens/s (loraplex modes only).

All requests stream, ``ignore_eos``. Refused requests (429: a full tenant queue or a queue
wait past ``queue_timeout_seconds``) wait their ``Retry-After`` and go again; they are
counted. The goals of issue 10 are judged at 96 streams: quiet p99 <= 2x alone, flood >= 0.8x
alone, weights 2:1 within 10%. Writes ``bench/results/noisy_neighbour.json`` and the table in
``bench/README.md``.

    .venv/bin/python -m bench.noisy_neighbour                     # lend + fifo: ~25 min on 2 cores
    .venv/bin/python -m bench.noisy_neighbour --floods 12,48,96,192 --vllm
    .venv/bin/python -m bench.noisy_neighbour --modes fair,lend   # unused shares kept vs lent
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench._common import (
    SCRATCH,
    SERVED_NAME,
    Engine,
    base_model_dir,
    loraplex_server,
    machine_line,
    ratio,
    update_readme,
    vllm_server,
    write_result,
)
from bench._streams import Flood, Load, latency_summary, settle

MODES = {
    "fair": "loraplex, fair admission",
    "lend": "loraplex, fair admission, lending",
    "fifo": "loraplex, admission off",
    "vllm": "vLLM server",
}
NO_ADMISSION = "100000"
TENANTS = {"quiet": 1.0, "flood": 1.0, "heavy": 2.0, "light": 1.0}
GOAL_STREAMS = 96
GOAL_P99 = 2.0
GOAL_FLOOD = 0.8
GOAL_WEIGHTS = (2.0, 0.10)


def make_tenants(home: Path) -> dict[str, str]:
    """A fresh registry under ``home`` with the tenants of ``TENANTS``; their keys by name."""
    from loraplex.config import Settings
    from loraplex.registry.registry import open_accounts

    shutil.rmtree(home, ignore_errors=True)
    accounts = open_accounts(Settings(home=home))
    try:
        keys = {}
        for name, weight in TENANTS.items():
            accounts.create_tenant(name, weight=weight)
            keys[name] = accounts.create_key(name)[1]
        return keys
    finally:
        accounts.close()


def log(mode: str, message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {mode}: {message}", flush=True)


async def measure(
    mode: str, url: str, keys: dict[str, str | None], admin: str | None, args: argparse.Namespace
) -> dict[str, Any]:
    """Every phase against one running server."""
    load = Load(url, SERVED_NAME, admin)
    capacity = args.max_num_seqs
    try:
        await load.sequential(keys["quiet"], args.quiet_tokens, 2)  # warm-up
        alone = latency_summary(
            await load.sequential(keys["quiet"], args.quiet_tokens, args.quiet_requests)
        )
        log(mode, f"quiet alone: p50 {alone['p50_s']} s, p99 {alone['p99_s']} s")
        floods = {}
        for streams in args.floods:
            floods[str(streams)] = await flood_point(mode, load, keys, streams, alone, args)
        weights = None
        if mode != "vllm" and args.weight_streams:
            weights = await weighted(load, keys, args.weight_streams, capacity, args)
            log(
                mode,
                f"weights 2:1: {weights['heavy']['tokens_per_s']} vs "
                f"{weights['light']['tokens_per_s']} tok/s, ratio {weights['ratio']}",
            )
        return {"quiet_alone": alone, "floods": floods, "weights": weights}
    finally:
        await load.close()


async def flood_point(
    mode: str,
    load: Load,
    keys: dict[str, str | None],
    streams: int,
    alone: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The flood of ``streams`` alone, then with the quiet tenant."""
    generating = min(streams, args.max_num_seqs)
    flood = Flood(load, keys["flood"], streams, args.flood_tokens)
    await load.wait_idle()
    flood.start()
    try:
        await settle([flood], generating, args.settle_timeout)
        start = time.perf_counter()
        await asyncio.sleep(args.flood_seconds)
        flood_alone = flood.summary(start, time.perf_counter())
    finally:
        await flood.stop()
    log(mode, f"{streams} streams alone: {flood_alone['tokens_per_s']} tok/s")

    flood = Flood(load, keys["flood"], streams, args.flood_tokens)
    await load.wait_idle()
    flood.start()
    try:
        await settle([flood], generating, args.settle_timeout)
        start = time.perf_counter()
        quiet = latency_summary(
            await load.sequential(
                keys["quiet"], args.quiet_tokens, args.quiet_requests, args.flood_seconds
            )
        )
        flooded = flood.summary(start, time.perf_counter())
    finally:
        await flood.stop()
    point = {
        "flood_alone": flood_alone,
        "quiet": quiet,
        "flood": flooded,
        "quiet_p50_ratio": ratio(quiet["p50_s"], alone["p50_s"]),
        "quiet_p99_ratio": ratio(quiet["p99_s"], alone["p99_s"]),
        "flood_ratio": ratio(flooded["tokens_per_s"], flood_alone["tokens_per_s"]),
    }
    log(
        mode,
        f"{streams} streams + quiet: quiet p50 {quiet['p50_s']} s ({point['quiet_p50_ratio']}x), "
        f"p99 {quiet['p99_s']} s ({point['quiet_p99_ratio']}x), {quiet['ok']}/"
        f"{quiet['requests']} ok; flood {flooded['tokens_per_s']} tok/s "
        f"({point['flood_ratio']}x), refused {flooded['failures'] or 0}",
    )
    return point


async def weighted(
    load: Load,
    keys: dict[str, str | None],
    streams: int,
    capacity: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Tenants of weight 2 and 1 flooding at once: their tokens/s and its ratio."""
    floods = {
        name: Flood(load, keys[name], streams, args.flood_tokens) for name in ("heavy", "light")
    }
    await load.wait_idle()
    for flood in floods.values():
        flood.start()
    try:
        await settle(list(floods.values()), min(2 * streams, capacity), args.settle_timeout)
        start = time.perf_counter()
        await asyncio.sleep(args.flood_seconds)
        end = time.perf_counter()
    finally:
        for flood in floods.values():
            await flood.stop()
    result: dict[str, Any] = {name: f.summary(start, end) for name, f in floods.items()}
    result["ratio"] = ratio(result["heavy"]["tokens_per_s"], result["light"]["tokens_per_s"])
    return result


def goals(result: dict[str, Any]) -> dict[str, Any]:
    """Issue 10's goals at ``GOAL_STREAMS`` streams (else the largest flood measured)."""
    sizes = sorted(int(n) for n in result["floods"])
    streams = GOAL_STREAMS if GOAL_STREAMS in sizes else sizes[-1]
    point = result["floods"][str(streams)]
    p99, flood = point["quiet_p99_ratio"], point["flood_ratio"]
    out: dict[str, Any] = {
        "streams": streams,
        "quiet_p99": {
            "ratio": p99,
            "goal": f"<= {GOAL_P99}",
            "met": p99 is not None and p99 <= GOAL_P99,
        },
        "flood_throughput": {
            "ratio": flood,
            "goal": f">= {GOAL_FLOOD}",
            "met": flood is not None and flood >= GOAL_FLOOD,
        },
    }
    weights = result.get("weights")
    if weights is not None:
        target, slack = GOAL_WEIGHTS
        r = weights["ratio"]
        out["weights"] = {
            "ratio": r,
            "goal": f"{target} +/- {slack:.0%}",
            "met": r is not None and abs(r / target - 1) <= slack,
        }
    return out


def run_mode(
    mode: str, engine: Engine, keys: dict[str, str], home: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Start the mode's server, measure, stop it."""
    log_file = SCRATCH / f"noisy-{mode}.log"
    started = time.monotonic()
    if mode == "vllm":
        server = vllm_server(engine, [], log_file)
        tenant_keys: dict[str, str | None] = dict.fromkeys(keys)
        admin = None
    else:
        admin = secrets.token_urlsafe(16)
        env = {"LORAPLEX_AUTH": "on", "LORAPLEX_HOME": str(home), "LORAPLEX_ADMIN_KEY": admin}
        if mode == "fifo":
            env["LORAPLEX_MAX_ENGINE_SEQUENCES"] = NO_ADMISSION
        else:
            env["LORAPLEX_LEND_SEQUENCES"] = str(args.lend_sequences if mode == "lend" else 0)
        env.update(args.settings)
        adapters = home / "adapters"  # empty: base model only
        adapters.mkdir(parents=True, exist_ok=True)
        server = loraplex_server(engine, adapters, log_file, env)
        tenant_keys = dict(keys)
    with server as running:
        startup = round(time.monotonic() - started, 1)
        log(mode, f"{MODES[mode]} ready in {startup} s at {running.url}")
        result = asyncio.run(measure(mode, running.url, tenant_keys, admin, args))
    result["startup_s"] = startup
    result["goals"] = goals(result)
    return result


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| server | flood streams | quiet p50 s alone -> flooded | quiet p99 s alone -> "
        "flooded | flood tok/s alone -> with quiet | quiet ok | flood refused |",
        "|---|---:|---|---|---|---:|---|",
    ]
    for mode, result in results.items():
        alone = result["quiet_alone"]
        for streams, p in result["floods"].items():
            q, f, fa = p["quiet"], p["flood"], p["flood_alone"]
            rows.append(
                f"| {MODES[mode]} | {streams} | {alone['p50_s']} -> {q['p50_s']} "
                f"(**{p['quiet_p50_ratio']}x**) | {alone['p99_s']} -> {q['p99_s']} "
                f"(**{p['quiet_p99_ratio']}x**) | {fa['tokens_per_s']} -> {f['tokens_per_s']} "
                f"(**{p['flood_ratio']}x**) | {q['ok']}/{q['requests']} | "
                f"{_refused(fa, f)} |"
            )
    weights = [
        f"| {MODES[mode]} | {w['heavy']['tokens_per_s']} | {w['light']['tokens_per_s']} | "
        f"**{w['ratio']}** | {_refused(w['heavy'], w['light'])} |"
        for mode, result in results.items()
        if (w := result["weights"]) is not None
    ]
    if weights:
        rows += [
            "",
            "| server | weight 2 tok/s | weight 1 tok/s | ratio (goal 2.0 +/- 10%) | refused |",
            "|---|---:|---:|---:|---|",
            *weights,
        ]
    return "\n".join(rows)


def _refused(*summaries: dict[str, Any]) -> str:
    """Failed flood requests of some phases, by status."""
    total: Counter[str] = Counter()
    for summary in summaries:
        total.update(summary["failures"])
    return ", ".join(f"{n}x {status}" for status, n in sorted(total.items())) or "0"


def goal_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for mode, result in results.items():
        g = result["goals"]
        parts = [
            f"quiet p99 {g['quiet_p99']['ratio']}x (goal {g['quiet_p99']['goal']}): "
            f"{_met(g['quiet_p99'])}",
            f"flood {g['flood_throughput']['ratio']}x (goal {g['flood_throughput']['goal']}): "
            f"{_met(g['flood_throughput'])}",
        ]
        if "weights" in g:
            parts.append(
                f"weights {g['weights']['ratio']} (goal {g['weights']['goal']}): "
                f"{_met(g['weights'])}"
            )
        lines.append(f"{MODES[mode]} at {g['streams']} streams: " + "; ".join(parts))
    return lines


def _met(goal: dict[str, Any]) -> str:
    return "met" if goal["met"] else "NOT met"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--modes", default="lend,fifo", help="of fair, lend, fifo (comma-separated)"
    )
    parser.add_argument("--vllm", action="store_true", help="also vLLM's own server")
    parser.add_argument("--floods", default="12,48,96", help="flood sizes (concurrent streams)")
    parser.add_argument("--quiet-requests", type=int, default=12)
    parser.add_argument("--quiet-tokens", type=int, default=16)
    parser.add_argument("--flood-tokens", type=int, default=128)
    parser.add_argument(
        "--flood-seconds", type=float, default=60, help="measuring window of each flood phase"
    )
    parser.add_argument(
        "--weight-streams",
        type=int,
        default=None,
        help="streams per weighted tenant "
        "(default: max_num_seqs, so both have a backlog; 0 skips the weights phase)",
    )
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument(
        "--lend-sequences",
        type=int,
        default=None,
        help="seats the lend mode may lend (default: the server's, a quarter of max_num_seqs)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a loraplex setting for the loraplex modes (repeatable), e.g. reserved_sequences=4",
    )
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--fast-lora", choices=["on", "off"], default="on")
    parser.add_argument(
        "--settle-timeout", type=float, default=600, help="longest wait for a flood to start"
    )
    args = parser.parse_args()
    args.modes = [m for m in args.modes.split(",") if m] + (["vllm"] if args.vllm else [])
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from fair, lend, fifo")
    if any("=" not in item for item in args.set):
        parser.error("--set takes FIELD=VALUE")
    args.settings = {
        f"LORAPLEX_{field.upper()}": value
        for field, value in (item.split("=", 1) for item in args.set)
    }
    args.floods = [int(n) for n in args.floods.split(",")]
    if args.weight_streams is None:
        args.weight_streams = args.max_num_seqs
    if args.lend_sequences is None:
        args.lend_sequences = args.max_num_seqs // 4
    return args


def main() -> None:
    args = parse_args()
    engine = Engine(
        base=base_model_dir(),
        dtype=args.dtype,
        fast_lora=args.fast_lora,
        max_num_seqs=args.max_num_seqs,
    )
    home = SCRATCH / "noisy-home"
    keys = make_tenants(home)
    results = {mode: run_mode(mode, engine, keys, home, args) for mode in args.modes}
    workload = {
        "floods": args.floods,
        "quiet_requests": args.quiet_requests,
        "quiet_tokens": args.quiet_tokens,
        "flood_tokens": args.flood_tokens,
        "flood_seconds": args.flood_seconds,
        "weight_streams": args.weight_streams,
        "settings": args.settings,
        "lend_sequences": args.lend_sequences,
        "tenant_weights": TENANTS,
        "endpoint": "completion",
        "stream": True,
        "ignore_eos": True,
    }
    path = write_result(
        "noisy_neighbour",
        {
            "description": "quiet tenant's latency and flood's throughput, alone and together",
            "engine": engine.describe(),
            "workload": workload,
            "modes": results,
        },
    )
    print("\n" + table(results) + "\n")
    goals_text = goal_lines(results)
    print("\n".join(goals_text))
    _readme(results, goals_text, args)
    print(f"wrote {path}")


def _readme(results: dict, goals_text: list[str], args: argparse.Namespace) -> None:
    head = (
        f"Machine: {machine_line()}. {args.dtype}, max_num_seqs {args.max_num_seqs}, base "
        f"model. Quiet tenant: sequential {args.quiet_tokens}-token requests ({args.quiet_requests}"
        f" alone; with a flood, at least that many and for {args.flood_seconds:.0f} s). Flood: "
        f"N concurrent {args.flood_tokens}-token streams, tokens/s over {args.flood_seconds:.0f} s "
        f"once the engine is full. All streamed, ignore_eos. "
        f"{'Settings: ' + str(args.settings) + '. ' if args.settings else ''}"
        f"{f'Lend mode: up to {args.lend_sequences} seats lent. ' if 'lend' in results else ''}"
        f"Run "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
    )
    goals_md = "\n".join(f"- {line}" for line in goals_text)
    update_readme(
        "noisy_neighbour", f"{head}\n\n{table(results)}\n\nGoals (issue 10):\n\n{goals_md}"
    )


if __name__ == "__main__":
    main()
