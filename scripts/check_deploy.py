"""Check deploy/ray offline (``make lint``): nothing here reaches a cluster.

- ``serve.yaml``: Ray Serve's own config schema (``ServeDeploySchema``), import paths that
  resolve, and a graceful-shutdown timeout equal to the server's drain (shutdown_timeout).
- ``rayservice.yaml``: its serveConfigV2 is serve.yaml; each pod template is a valid Kubernetes
  pod (kubernetes-validate's bundled schemas, strict), has readiness and liveness probes, and a
  termination grace period longer than the drain; its LORAPLEX_SHUTDOWN_TIMEOUT is the drain.
- ``cluster.yaml``: Ray's cluster-launcher schema (shipped with Ray).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import ray.autoscaler
import yaml
from ray.serve.schema import ServeDeploySchema

ROOT = Path(__file__).resolve().parent.parent / "deploy" / "ray"
KUBERNETES_VERSION = "1.32.0"


def load(name: str) -> Any:
    return yaml.safe_load((ROOT / name).read_text())


def check_serve_config(config: dict[str, Any]) -> float:
    """Validate a Serve config; return the replicas' graceful shutdown timeout."""
    schema = ServeDeploySchema.model_validate(config)
    timeouts = []
    for app in schema.applications:
        module, _, attr = app.import_path.partition(":")
        if not callable(getattr(importlib.import_module(module), attr, None)):
            raise SystemExit(f"{app.name}: import_path {app.import_path} does not resolve")
        timeouts += [
            d.graceful_shutdown_timeout_s
            for d in app.deployments
            if d.name == "LoraplexReplica" and isinstance(d.graceful_shutdown_timeout_s, float)
        ]
    if len(timeouts) != 1:
        raise SystemExit("serve.yaml: LoraplexReplica needs graceful_shutdown_timeout_s")
    return timeouts[0]


def check_pod(where: str, template: dict[str, Any], drain: float) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, **template}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    spec = template["spec"]
    if spec.get("terminationGracePeriodSeconds", 30) <= drain:
        raise SystemExit(f"{where}: terminationGracePeriodSeconds must exceed the drain {drain}")
    for container in spec["containers"]:
        for probe in ("readinessProbe", "livenessProbe"):
            if probe not in container:
                raise SystemExit(f"{where}/{container['name']}: no {probe}")
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        if float(env.get("LORAPLEX_SHUTDOWN_TIMEOUT", "nan")) != drain:
            raise SystemExit(f"{where}: LORAPLEX_SHUTDOWN_TIMEOUT must be {drain}")


def main() -> None:
    serve_config = load("serve.yaml")
    drain = check_serve_config(serve_config)
    service = load("rayservice.yaml")
    if yaml.safe_load(service["spec"]["serveConfigV2"]) != serve_config:
        raise SystemExit("rayservice.yaml: serveConfigV2 differs from serve.yaml")
    cluster = service["spec"]["rayClusterConfig"]
    check_pod("headGroupSpec", cluster["headGroupSpec"]["template"], drain)
    for group in cluster["workerGroupSpecs"]:
        check_pod(group["groupName"], group["template"], drain)
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(load("cluster.yaml"), json.loads(schema_path.read_text()))
    print(f"deploy/ray: serve.yaml, rayservice.yaml, cluster.yaml valid (drain {drain:g} s)")


if __name__ == "__main__":
    sys.exit(main())
