"""Ray Serve: what the router costs per request, measured in one run.

Deploys what ``loraplex serve --ray --replicas 2`` deploys (the same applications), from this
process on a local Ray cluster, with one difference: the replicas' own FastAPI ingress is also
reachable through Serve's proxy under ``/direct``, so the same request can go through the
router (proxy -> router -> replica) or straight to a replica (proxy -> replica). It sends
streamed requests one at a time (nothing queues), each twice in a row, through the router and
straight (the order alternates), and reports client-side TTFT and latency p50/p99 of both and
of their paired difference: the router's cost per request (its registry lookup, the extra hop
and the relay of every chunk). The registry lookup alone is timed here too, as the router runs
it (``routing_key`` on the same registry). Half the requests name the base model (the router
resolves it without a query), half an adapter pushed to a scratch registry (SQLite + blob
folder under ``bench/results/tmp``, or ``--registry-url``/``--blob-url``: Postgres + S3 as on
a cluster). Writes ``bench/results/ray_router_cost.json``.

    .venv/bin/python -m bench.ray_router_cost
    .venv/bin/python -m bench.ray_router_cost --requests 200 --max-tokens 32
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench._common import (
    SCRATCH,
    SERVED_NAME,
    Engine,
    adapter_paths,
    base_model_dir,
    make_adapters,
    write_result,
)
from loraplex.config import Settings
from loraplex.testing.launcher import reserved_port

PROMPT = "Write a short story about a lighthouse keeper"
PATHS = {"router": "", "direct": "/direct"}
"""URL prefix of each way to a replica."""


def settings_for(engine: Engine, home: Path, port: int, args: argparse.Namespace) -> Settings:
    return Settings(
        home=home,
        base_model=engine.base,
        served_model_name=SERVED_NAME,
        auth="off",
        host="127.0.0.1",
        port=port,
        registry_url=args.registry_url,
        blob_url=args.blob_url,
        **{k: v for k, v in engine.describe().items() if k != "base"},
    )


def push_adapter(settings: Settings, folder: Path) -> str:
    """The first adapter of ``folder`` (``make_adapters``) pushed to the registry ``settings``
    names (the same content again is the same version); its name."""
    from loraplex.registry.registry import open_registry

    ((name, path),) = adapter_paths(folder, 1)
    registry = open_registry(settings)
    try:
        registry.push(path, name)
    finally:
        registry.close()
    return name


@contextmanager
def deployed(settings: Settings) -> Iterator[None]:
    """The router at ``/`` and two replicas, also at ``/direct``, as ``serve --ray`` runs them,
    on a local Ray cluster until the block ends."""
    import ray
    from ray import serve

    from loraplex.server import ray_serve

    ray.init(namespace="loraplex", log_to_driver=False)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        replicas = ray_serve.replicas_application(settings, 2, settings.max_cpu_loras)
        serve.run(replicas, name=ray_serve.REPLICAS_APP_NAME, route_prefix="/direct")
        router = ray_serve.router_application(settings)
        serve.run(router, name=ray_serve.APP_NAME, route_prefix="/")
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def wait_ready(client: httpx.Client, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            codes = {client.get(prefix + "/ready").status_code for prefix in PATHS.values()}
            if codes == {200}:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError("the router or the replicas did not get ready")


def timed_stream(client: httpx.Client, prefix: str, model: str, max_tokens: int) -> tuple:
    """(TTFT, latency) in ms of one streamed completion."""
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    started = time.perf_counter()
    first = None
    with client.stream("POST", prefix + "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith("data: {"):
                choices = json.loads(line[len("data: ") :]).get("choices")
                if choices and choices[0].get("text"):
                    first = time.perf_counter()
    ended = time.perf_counter()
    if first is None:
        raise RuntimeError(f"no token from {prefix or '/'} for {model}")
    return (first - started) * 1000, (ended - started) * 1000


def lookup_ms(settings: Settings, model: str, rounds: int) -> list[float]:
    """The router's work before its hop, timed: ``routing_key`` on a request body (the
    registry lookup; none for the base model)."""
    from loraplex.server.ray_router import VersionResolver, routing_key

    resolver = VersionResolver(settings)
    body = json.dumps({"model": model, "prompt": PROMPT}).encode()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        routing_key("/v1/completions", body, resolver)
        times.append((time.perf_counter() - started) * 1000)
    return times


def summary(values: np.ndarray) -> dict[str, float]:
    """p50, p99 and mean in ms, rounded."""
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": round(p50, 3), "p99": round(p99, 3), "mean": round(float(np.mean(values)), 3)}


def measure(client: httpx.Client, models: dict[str, str], args: argparse.Namespace) -> dict:
    """Per kind of model (base, adapter): TTFT and latency through the router and straight,
    and the router's cost (the paired difference)."""
    runs: dict[str, dict[str, list[tuple[float, float]]]] = {
        kind: {way: [] for way in PATHS} for kind in models
    }
    for i in range(args.requests):
        kind = list(models)[i % len(models)]
        ways = list(PATHS) if i // len(models) % 2 == 0 else list(PATHS)[::-1]
        for way in ways:
            runs[kind][way].append(timed_stream(client, PATHS[way], models[kind], args.max_tokens))
    out: dict[str, Any] = {}
    for kind, by_way in runs.items():
        router, direct = np.array(by_way["router"]), np.array(by_way["direct"])
        row: dict[str, Any] = {"model": models[kind], "requests": len(router)}
        for column, metric in enumerate(("ttft", "latency")):
            row[f"router_{metric}_ms"] = summary(router[:, column])
            row[f"direct_{metric}_ms"] = summary(direct[:, column])
            row[f"router_cost_{metric}_ms"] = summary(router[:, column] - direct[:, column])
        out[kind] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100, help="pairs, base and adapter")
    parser.add_argument("--warmup", type=int, default=16, help="pairs of each kind first")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--registry-url", help="default: SQLite under the scratch home")
    parser.add_argument("--blob-url", help="default: a folder under the scratch home")
    args = parser.parse_args()
    engine = Engine(base=base_model_dir(), dtype=args.dtype, max_model_len=512)
    with reserved_port() as port:
        settings = settings_for(engine, SCRATCH / "ray-router-cost", port, args)
    adapter = push_adapter(settings, make_adapters(engine.base, 1, 8, ["q_proj", "v_proj"]))
    models = {"base": SERVED_NAME, "adapter": adapter}
    lookups = {kind: summary(np.array(lookup_ms(settings, m, 200))) for kind, m in models.items()}
    url = f"http://{settings.host}:{settings.port}"
    with deployed(settings), httpx.Client(base_url=url, timeout=300) as client:
        wait_ready(client)
        warmup = argparse.Namespace(**{**vars(args), "requests": args.warmup * len(models)})
        measure(client, models, warmup)  # loads the adapter on both replicas, warms the paths
        kinds = measure(client, models, args)
    for kind, lookup in lookups.items():
        kinds[kind]["router_lookup_ms"] = lookup
    for kind, row in kinds.items():
        print(kind, json.dumps(row), flush=True)
    path = write_result(
        "ray_router_cost",
        {
            "description": "TTFT and latency through the Ray Serve router vs straight to a "
            "replica (same proxy, same replicas, paired requests); the router's lookup alone",
            "engine": engine.describe(),
            "workload": vars(args),
            "kinds": kinds,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
