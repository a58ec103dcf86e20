"""Which CPU cores a Ray Serve replica's vLLM engine binds its OpenMP threads to.

vLLM on CPU binds its worker's OpenMP threads itself (``VLLM_CPU_OMP_THREADS_BIND``, default
``auto``: every allowed core of the first NUMA node but one, which it keeps for the scheduler;
``OMP_PLACES`` + ``OMP_PROC_BIND=true`` and ``OMP_NUM_THREADS`` set to match). Every replica
on a node computes the same list, so N replicas all pin their threads to the same cores and
leave the others idle. All replicas share one ``runtime_env``, so the environment cannot tell
them apart: each replica therefore claims a slot of its own at start, before its engine, and
sets ``VLLM_CPU_OMP_THREADS_BIND`` to it: slot ``i`` is the ``i``-th run of as many of the
node's allowed cores as Ray gave the replica (``num_cpus`` in ``ray_actor_options``, 1 by
default). Claims live in Ray's key-value store by node, with the claimer's pid: a replacement
takes over the slot of a replica whose process died. When no whole slot is left (more
replicas than cores), the replica binds nothing (``nobind``: the OS spreads the threads, and
``OMP_NUM_THREADS``, which Ray sets to ``num_cpus``, bounds them). A value the user set in
the environment is left alone.
"""

from __future__ import annotations

import logging
import os

import ray
from ray.experimental import internal_kv

log = logging.getLogger("loraplex.server")

BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
KV_NAMESPACE = "loraplex"
KV_PREFIX = "cpu-slot/"


def slots(cores: list[int], per_replica: int) -> list[list[int]]:
    """The whole runs of ``per_replica`` cores in ``cores`` (sorted)."""
    cores = sorted(cores)
    size = max(1, per_replica)
    return [cores[i : i + size] for i in range(0, len(cores) - size + 1, size)]


def alive(pid: int) -> bool:
    """Whether process ``pid`` of this node exists."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(node: str, count: int, pid: int) -> int | None:
    """The first slot index on ``node`` that is free or whose claimer is gone, now ``pid``'s."""
    for index in range(count):
        key = f"{KV_PREFIX}{node}/{index}"
        if not internal_kv._internal_kv_put(key, str(pid), overwrite=False, namespace=KV_NAMESPACE):
            return index  # put answers whether the key existed already
        held = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        owner = int(held) if held else 0
        if owner == pid:
            return index
        if not alive(owner):
            # two replacements may race here: the re-read below settles which one won
            internal_kv._internal_kv_put(key, str(pid), overwrite=True, namespace=KV_NAMESPACE)
            if internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE) == str(pid).encode():
                return index
    return None


def bind_engine_threads() -> str:
    """Set ``VLLM_CPU_OMP_THREADS_BIND`` for this replica's engine (unless set); return it."""
    if os.environ.get(BIND_ENV):
        return os.environ[BIND_ENV]
    context = ray.get_runtime_context()
    per_replica = int(context.get_assigned_resources().get("CPU", 1) or 1)
    runs = slots(list(os.sched_getaffinity(0)), per_replica)
    index = claim(context.get_node_id(), len(runs), os.getpid())
    value = "nobind" if index is None else ",".join(map(str, runs[index]))
    os.environ[BIND_ENV] = value
    log.info("ray: this replica's engine threads: %s=%s", BIND_ENV, value)
    return value
