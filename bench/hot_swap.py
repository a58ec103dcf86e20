"""Hot swap: how fast a promote reaches traffic, and what a cold adapter version costs.

One registry-backed loraplex server per blob store: ``disk`` (the local folder store) and
``s3`` (a ``moto_server`` S3 endpoint). The server has its own ``LORAPLEX_HOME``, so its blob
cache starts empty: a version's first request fetches it from the store and loads it into
the engine. Each of ``--stores`` is one server start and one row of the table:

1. hot swap under load (``disk`` only, or every store with ``--swap-all``): 3 adapters with
   two versions each, ``--workers`` client threads sending 4-token completions (every other
   one streamed) over the three in turn, ``--swaps`` promotes and rollbacks in turn; for each,
   the time from the registry call returning to the first response of the new version, and
   the failed requests (goal: p50 and max < 1 s, 0 failed);
2. TTFT of a streamed 8-token completion for a version never served on this server (cold),
   the same again (warm), and a version first warmed by ``promote --preload``'s mechanism
   (``Registry.preload``: every live server loads it and acknowledges), over ``--repeats``
   versions each; cold - warm is the median of each version's own difference (goal: cold
   from disk <= warm + 16 ms, from the store <= warm + 50 ms).
3. ``vllm``: the same cold and warm TTFT on vLLM's own server (same engine settings but 2
   slots and 2 CPU cache entries, so that a cold adapter is read from its folder again),
   for comparison in the same run. Its adapters were loaded once at start (``--lora-modules``)
   and evicted, so its cold request reloads inside the engine step, in the request's own
   step, which vLLM only does for an adapter it has loaded before.
4. ``disk-reload``: loraplex on the ``disk`` store with the ``vllm`` row's engine settings,
   every version served once first: a cold request reloads an evicted version from the
   local blob cache (issue 15's definition of a cold load from local disk).
5. ``vllm-resolver``: vLLM's own on-demand first load, the counterpart of loraplex's cold
   request: the same engine settings as loraplex, no adapter named at start, and vLLM's
   filesystem LoRA resolver (``VLLM_LORA_RESOLVER_CACHE_DIR``), which on the first request
   for a name loads that folder with ``add_lora`` and then serves the request.

Writes ``bench/results/hot_swap.json`` and the table in ``bench/README.md``.

    .venv/bin/python -m bench.hot_swap                    # ~15 min on 2 cores (5 server starts)
    .venv/bin/python -m bench.hot_swap --swaps 10 --repeats 2   # smaller
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench._common import (
    SCRATCH,
    SERVED_NAME,
    Engine,
    adapter_paths,
    base_model_dir,
    machine_line,
    make_adapters,
    update_readme,
    vllm_server,
    write_result,
)
from loraplex.config import Settings
from loraplex.registry.registry import Registry, open_registry
from loraplex.testing.launcher import loraplex_server, reserved_port, running_server
from loraplex.testing.rollout_load import AliasTimeline, RolloutLoad, move_alias

SWAP_NAMES = ("swap-a", "swap-b", "swap-c")
WARM_SAMPLES = 3  # warm TTFTs per version, right after its cold one (their median)


@contextmanager
def moto() -> Iterator[str]:
    """A moto S3 endpoint (dummy credentials must be in the environment)."""
    import shutil
    import sys

    command = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    with reserved_port() as port:
        url = f"http://127.0.0.1:{port}"
        log = SCRATCH / "hot_swap-moto.log"
        argv = [command, "-H", "127.0.0.1", "-p", str(port)]
        with running_server(argv, log, url=url, ready_path="/", timeout=60):
            yield url


def store_settings(kind: str, root: Path, engine: Engine, stack: ExitStack) -> dict[str, str]:
    """Registry settings (``LORAPLEX_*`` names, lower case) for ``kind``."""
    settings = {
        "registry_url": f"sqlite:///{root / 'registry.db'}",
        "base_model": str(engine.base),
    }
    if kind == "disk":
        return {**settings, "blob_url": str(root / "blobs")}
    import boto3

    endpoint = stack.enter_context(moto())
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return {**settings, "blob_url": f"s3://{bucket}/adapters", "s3_endpoint_url": endpoint}


def ttft(client: httpx.Client, model: str) -> float:
    """Seconds to the first streamed token of an 8-token greedy completion (a version's
    samples stream the same tokens). A token of whitespace counts: this model's first token
    here is often a lone space, and waiting for visible text added a decode step to about a
    third of the samples (the bimodal TTFTs of the runs before 2026-12-06 22:40 UTC).
    ``client`` is kept across samples: a new one per request added ~20 ms of its own set-up to
    every TTFT (the runs before 2026-12-07 09:36 UTC)."""
    body = {
        "model": model,
        "prompt": "The weather today is",
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        first = None
        for line in response.iter_lines():
            if first is None and line.startswith("data: {"):
                choices = json.loads(line.removeprefix("data: "))["choices"]
                if any(choice["text"] for choice in choices):
                    first = time.perf_counter() - started
    if first is None:
        raise RuntimeError(f"no token from {model}")
    return first


def hot_swap(url: str, registry: Registry, swaps: int, workers: int) -> dict[str, Any]:
    """``swaps`` promotes/rollbacks under load: delay to the new version, failures."""
    timeline = AliasTimeline()
    for name in SWAP_NAMES:
        timeline.start(name, registry.resolve(name).key)
    time.sleep(1.0)
    moves: list[tuple[str, float, str]] = []
    with RolloutLoad(url, SWAP_NAMES, workers=workers) as load:
        time.sleep(2.0)
        for move in range(swaps):
            name = SWAP_NAMES[move % 3]
            returned, target = move_alias(registry, timeline, name, move)
            moves.append((name, returned, target))
            time.sleep(1.5)
        time.sleep(1.0)
    delays = []
    for name, returned, target in moves:
        seen = [
            a.answered
            for a in load.answers
            if a.model == name and a.version == target and a.answered >= returned
        ]
        delays.append(round(min(seen) - returned, 3) if seen else None)
    measured = [d for d in delays if d is not None]
    return {
        "swaps": swaps,
        "requests": len(load.answers),
        "failed": len(load.failures),
        "outside_alias_window": len(timeline.explain(load.answers, slack=1.0)),
        "delay_s": delays,
        "delay_p50_s": round(statistics.median(measured), 3) if measured else None,
        "delay_max_s": max(measured) if measured else None,
    }


def cold_warm_preloaded(
    url: str, versions: list[str], registry: Registry | None = None
) -> dict[str, Any]:
    """TTFT cold, warm and preloaded. For each of half of ``versions``: its first request
    (cold), then the median of ``WARM_SAMPLES`` more (warm); cold - warm is the median of
    these per-version differences (paired, so drift in the server's speed cancels). The
    other half is preloaded through ``registry`` first, then asked once (no registry: none)."""
    half = len(versions) // 2
    samples: dict[str, list[float]] = {"cold": [], "warm": [], "preloaded": []}
    with httpx.Client(base_url=url, timeout=300) as client:
        ttft(client, SERVED_NAME)
        for key in versions[:half]:
            samples["cold"].append(ttft(client, key))
            warm = [ttft(client, key) for _ in range(WARM_SAMPLES)]
            samples["warm"].append(statistics.median(warm))
        for key in versions[half:] if registry is not None else []:
            outcome = registry.preload(key, timeout=120, live_within=10)
            assert not outcome.failed and not outcome.missing, outcome
            samples["preloaded"].append(ttft(client, key))
    median = {k: round(statistics.median(v) * 1000, 1) for k, v in samples.items() if v}
    paired = statistics.median(c - w for c, w in zip(samples["cold"], samples["warm"], strict=True))
    preloaded = median.get("preloaded")
    return {
        "ttft_ms": median,
        "cold_minus_warm_ms": round(paired * 1000, 1),
        "preloaded_minus_warm_ms": None
        if preloaded is None
        else round(preloaded - median["warm"], 1),
        "samples_ms": {k: [round(x * 1000, 1) for x in v] for k, v in samples.items()},
    }


def run_vllm(engine: Engine, args: argparse.Namespace, folder: Path) -> dict:
    """Cold and warm TTFT on vLLM's own server, same settings but 2 engine slots and 2 CPU
    cache entries: it loads its ``--lora-modules`` at start, so only an adapter evicted since
    is read from its folder again (each cold one here: the last two loaded are never cold)."""
    adapters = adapter_paths(folder, 6 + 2 * args.repeats)[6:]
    small = dataclasses.replace(engine, max_loras=2, max_cpu_loras=2)
    with vllm_server(small, adapters, SCRATCH / "hot_swap-vllm.log") as server:
        return cold_warm_preloaded(server.url, [name for name, _ in adapters])


def run_vllm_resolver(engine: Engine, args: argparse.Namespace, folder: Path) -> dict:
    """Cold and warm TTFT on vLLM's own server, same settings as loraplex, each cold adapter
    loaded on its first request by vLLM's filesystem resolver. The resolver only takes an
    adapter made for the served model's path, so each folder is copied with that path."""
    resolver_dir = SCRATCH / f"hot_swap-resolver-{uuid.uuid4().hex[:6]}"
    names = []
    for name, path in adapter_paths(folder, 6 + 2 * args.repeats)[6:]:
        shutil.copytree(path, resolver_dir / name)
        config_path = resolver_dir / name / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = str(engine.base)
        config_path.write_text(json.dumps(config))
        names.append(name)
    env = {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_LORA_RESOLVER_CACHE_DIR": str(resolver_dir),
    }
    log = SCRATCH / "hot_swap-vllm-resolver.log"
    with vllm_server(engine, [], log, env=env) as server:
        return cold_warm_preloaded(server.url, names)


def run_store(kind: str, engine: Engine, args: argparse.Namespace, folder: Path) -> dict:
    """One loraplex server on store ``kind``; ``disk-reload``: the ``disk`` store with the
    ``vllm`` row's 2 slots and 2 CPU-cache entries, every version served once first, so
    that each cold request reloads an evicted version from the local blob cache."""
    root = SCRATCH / f"hot_swap-{kind}-{uuid.uuid4().hex[:6]}"
    reload = kind == "disk-reload"
    if reload:
        kind, engine = "disk", dataclasses.replace(engine, max_loras=2, max_cpu_loras=2)
    with ExitStack() as stack:
        settings = store_settings(kind, root, engine, stack)
        registry = open_registry(Settings(home=root / "pusher", **settings))
        made = iter(adapter_paths(folder, 6 + 2 * args.repeats))
        for name in SWAP_NAMES:
            for _ in range(2):
                registry.push(next(made)[1], name)
        versions = [
            registry.push(path, f"ttft-{i}").version.key for i, (_, path) in enumerate(made)
        ]
        env = {
            "LORAPLEX_AUTH": "off",
            "LORAPLEX_HOME": str(root / "server"),
            "LORAPLEX_SERVED_MODEL_NAME": SERVED_NAME,
            **{f"LORAPLEX_{k.upper()}": v for k, v in settings.items()},
            **{f"LORAPLEX_{k.upper()}": str(v) for k, v in engine.describe().items()},
        }
        server = stack.enter_context(loraplex_server(root / "server.log", env=env, timeout=900))
        result: dict[str, Any] = {"blob_url": registry.blobs.url}
        if (kind == "disk" and not reload) or args.swap_all:
            result["hot_swap"] = hot_swap(server.url, registry, args.swaps, args.workers)
        if reload:
            with httpx.Client(base_url=server.url, timeout=300) as client:
                for version in versions:
                    ttft(client, version)  # into the blob cache; all but 2 evicted since
        result.update(cold_warm_preloaded(server.url, versions, registry))
        registry.close()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--stores",
        default="disk,s3,vllm,vllm-resolver,disk-reload",
        help="disk, s3, disk-reload: loraplex; vllm, vllm-resolver: vLLM's own server",
    )
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="versions per TTFT kind")
    parser.add_argument("--swap-all", action="store_true", help="hot swap on every store")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    import os

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    engine = Engine(base_model_dir(), dtype=args.dtype, max_lora_rank=16)
    folder = make_adapters(engine.base, 6 + 2 * args.repeats, 16, ["q_proj", "v_proj"])
    started = datetime.now(UTC)
    stores: dict[str, Any] = {}
    for kind in args.stores.split(","):
        if kind == "vllm":
            stores[kind] = run_vllm(engine, args, folder)
        elif kind == "vllm-resolver":
            stores[kind] = run_vllm_resolver(engine, args, folder)
        else:
            stores[kind] = run_store(kind, engine, args, folder)
        load = Path("/proc/loadavg").read_text().split()[:3]
        result = {
            "settings": {**vars(args), "engine": engine.describe()},
            "stores": stores,
            "load_average_after": load,
            "started": started.isoformat(),
        }
        path = write_result("hot_swap", result)  # after each store: a partial run is kept
    print(path.read_text())
    _readme(result, started)


def _readme(result: dict, started: datetime) -> None:
    rows = ["| store | cold TTFT ms | warm | preloaded | cold - warm (paired) | preloaded - warm |"]
    rows.append("|---|---|---|---|---|---|")
    for kind, r in result["stores"].items():
        t = r["ttft_ms"]
        preloaded = r["preloaded_minus_warm_ms"]
        rows.append(
            f"| {kind} | {t['cold']} | {t['warm']} | {t.get('preloaded', '-')} | "
            f"{r['cold_minus_warm_ms']} | {'-' if preloaded is None else preloaded} |"
        )
    swap = result["stores"].get("disk", {}).get("hot_swap")
    lines = [
        f"Machine: {machine_line()}; load average after the run "
        f"{' '.join(result['load_average_after'])}. Run {started:%Y-%m-%d %H:%M} UTC.",
        "",
    ]
    if swap:
        lines += [
            f"Hot swap under load ({swap['swaps']} promotes and rollbacks, {swap['requests']} "
            f"requests): promote returned -> first response of the new version p50 "
            f"{swap['delay_p50_s']} s, max {swap['delay_max_s']} s; failed requests "
            f"{swap['failed']}; responses outside the alias window (1 s slack) "
            f"{swap['outside_alias_window']}.",
            "",
        ]
    update_readme("hot_swap", "\n".join(lines + rows))


if __name__ == "__main__":
    main()
