"""``loraplex serve --ray``: deploy the router and the engine replicas on Ray Serve, then wait.

Connects to ``address`` (``ray://HOST:PORT`` or ``auto``) or, without one, starts a local Ray
cluster. Ray Serve's HTTP proxy listens on ``settings.host:port`` and sends everything to the
router (``ray_router``), which picks a replica (``ray_replica``) by adapter version. The
replicas are a fixed number or autoscaled by Ray Serve on requests in progress and queued. The
replicas share the registry that ``settings`` names (Postgres + S3 between machines; the local
SQLite + blob folder under ``LORAPLEX_HOME`` on one host). SIGTERM or Ctrl-C deletes the
application: Ray stops routing to the replicas, lets requests in progress finish for up to
``shutdown_timeout`` seconds and then runs each app's drain.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import ray
import typer
from ray import serve
from ray.serve.config import AutoscalingConfig

from loraplex.config import Settings, load_settings
from loraplex.errors import LoraplexError
from loraplex.server.ray_replica import replica_class
from loraplex.server.ray_router import LoraplexRouter

log = logging.getLogger("loraplex.server")

APP_NAME = "loraplex"
REPLICAS_APP_NAME = "loraplex-replicas"
"""The replicas are an application of their own, not exposed over HTTP: Ray Serve allows one
FastAPI ingress per application, and both the router and the replicas are FastAPI apps."""

Replicas = int | dict[str, Any]
"""A fixed replica count, or Ray Serve's ``autoscaling_config`` (its fields as a dict)."""


def autoscaling_config(text: str) -> dict[str, Any]:
    """``--autoscaling-config``'s JSON, checked against Ray Serve's ``AutoscalingConfig``."""
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise LoraplexError(f"--autoscaling-config is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise LoraplexError("--autoscaling-config must be a JSON object.")
    unknown = sorted(set(config) - set(AutoscalingConfig.model_fields))
    if unknown:
        raise LoraplexError(f"--autoscaling-config: unknown fields {unknown} (docs/ray.md).")
    try:
        AutoscalingConfig(**config)
    except ValueError as exc:  # pydantic's ValidationError
        raise LoraplexError(f"--autoscaling-config: {' '.join(str(exc).split())}") from None
    return config


def describe(replicas: Replicas) -> str:
    """``replicas`` in words, for the startup lines."""
    if isinstance(replicas, int):
        return f"{replicas} replicas"
    low, high = replicas.get("min_replicas", 1), replicas.get("max_replicas", 1)
    return f"{low} to {high} replicas, autoscaled"


def replicas_application(
    settings: Settings, replicas: Replicas, adapters_per_replica: int
) -> serve.Application:
    """The engine replicas: the loraplex app, adapters multiplexed; a fixed count or
    autoscaled on requests in progress and queued (``replicas``)."""
    scaling: dict[str, Any] = (
        {"autoscaling_config": replicas}
        if isinstance(replicas, dict)
        else {"num_replicas": replicas}
    )
    return serve.deployment(
        replica_class(settings, adapters_per_replica),
        name="LoraplexReplica",
        **scaling,
        max_ongoing_requests=settings.max_num_seqs,
        graceful_shutdown_timeout_s=settings.shutdown_timeout,
        health_check_period_s=5,
        health_check_timeout_s=30,
    ).bind()


def router_application(settings: Settings, affinity: bool = True) -> serve.Application:
    """The HTTP ingress: resolves adapter versions and relays to the replicas."""
    return serve.deployment(
        LoraplexRouter,
        name="LoraplexRouter",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=10_000,
    ).bind(REPLICAS_APP_NAME, settings, affinity)


def serve_on_ray(
    settings: Settings,
    replicas: Replicas,
    address: str | None,
    adapters_per_replica: int,
    affinity: bool = True,
) -> None:
    """Deploy, print the URL, and block until a stop signal; then delete the application."""
    ray.init(address=address, namespace="loraplex", log_to_driver=True)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    stop = threading.Event()

    def on_signal(sig: int, frame: FrameType | None) -> None:
        log.info("%s received: draining the Ray Serve application", signal.Signals(sig).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    typer.echo(
        f"loraplex listening on http://{settings.host}:{settings.port} "
        f"(Ray Serve, {describe(replicas)} loading)"
    )
    serve.run(
        replicas_application(settings, replicas, adapters_per_replica),
        name=REPLICAS_APP_NAME,
        route_prefix=None,
    )
    serve.run(router_application(settings, affinity), name=APP_NAME, route_prefix="/")
    log.info("loraplex on Ray Serve: %s ready", describe(replicas))
    stop.wait()
    # Bounded: with a local cluster, a signal to the whole process group (a terminal's Ctrl-C,
    # a supervisor's killpg) stops some of Ray's own processes too, and Ray's calls then hang.
    drained = bounded(delete_applications, settings.shutdown_timeout + 15)
    if address is None:
        bounded(ray.shutdown, 15)  # stops the local cluster's processes this driver started
    if not drained:
        log.error("Ray Serve did not delete the applications in time; exiting")
        os._exit(1)  # skips Ray's atexit hook, which would hang the same way


def bounded(call: Callable[[], object], seconds: float) -> bool:
    """Run ``call`` in a daemon thread; whether it finished within ``seconds``."""
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


def delete_applications() -> None:
    """Delete the router, then the replicas (Ray drains each first)."""
    serve.delete(APP_NAME)
    serve.delete(REPLICAS_APP_NAME)


def replicas_builder(args: dict[str, str]) -> serve.Application:
    """The replicas as a Serve config's ``import_path`` (deploy/ray): settings from the
    ``LORAPLEX_*`` environment; ``args``: ``adapters_per_replica`` (default max_cpu_loras).
    Replica count and autoscaling come from the config's ``deployments`` section."""
    settings = load_settings()
    per_replica = int(args.get("adapters_per_replica", settings.max_cpu_loras))
    return replicas_application(settings, 1, per_replica)


def router_builder(args: dict[str, str]) -> serve.Application:
    """The router as a Serve config's ``import_path``; settings from the environment."""
    return router_application(load_settings())
