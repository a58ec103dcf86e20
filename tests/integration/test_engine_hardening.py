"""Adapters inside the real engine under faults, each beside a bystander tenant's good requests.

One ``loraplex serve`` over an adapters folder, with an adapter cache that holds two adapters
(rank 8 on every projection: ~9.3 MiB each in fp32) and at most two pins:
- a failed load is remembered: 50 requests for it cost the engine one attempt (issue 11 item 6)
- an adapter with bad shapes is refused at load; odd request shapes never fail (item 8)
- concurrent load/unload/pin end with the server's residency equal to the engine's, and
  streams in flight finish on their version through unload and replace (item 9)
- the cache is bounded in bytes and pins: eviction, then 503 and 409, never an OOM (item 11)
"""

from __future__ import annotations

import random
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from loraplex.adapters import WEIGHTS_FILE
from loraplex.testing.bystander import Bystander
from loraplex.testing.launcher import RunningServer, loraplex_server, server_env
from loraplex.testing.scrape import metric_sum

pytestmark = pytest.mark.integration

ADMIN_KEY = "hardening-admin-key"
BASE = "smollm2-135m"
GOOD = ("good1", "good2", "good3", "good4", "swap")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, make_random_adapter: Callable) -> Path:
    root = tmp_path_factory.mktemp("hardening-adapters")
    for seed, name in enumerate(GOOD, start=10):
        make_random_adapter(root / name, seed=seed)
    make_random_adapter(root / "bigrank", seed=20, rank=32)  # above the server's rank 16
    shutil.copytree(root / "good1", root / "badshape")
    tensors = load_file(root / "badshape" / WEIGHTS_FILE)
    name = next(k for k in sorted(tensors) if k.endswith("q_proj.lora_A.weight"))
    tensors[name] = np.ones((8, 575), dtype=np.float32)  # the base's q_proj takes 576
    save_file(tensors, root / "badshape" / WEIGHTS_FILE, metadata={"format": "pt"})
    return root


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path, folder: Path
) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("hardening-home")
    env = server_env(
        home,
        base_model_dir,
        adapters_dir=folder,
        admin_key=ADMIN_KEY,
        adapter_cache_mb=20,
        max_pinned_adapters=2,
    )
    with loraplex_server(home / "server.log", env=env) as running:
        yield running


@pytest.fixture
def bystander(server: RunningServer) -> Iterator[Bystander]:
    with Bystander(server.url, [BASE]) as running:
        yield running
        for _ in range(240):  # a fast test still lets it send a few requests
            if running.sent > 3:
                break
            threading.Event().wait(0.5)
    running.assert_clean()


def admin(server: RunningServer, action: str, model: str = "") -> httpx.Response:
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    if not action:
        return httpx.get(server.url + "/admin/adapters", headers=headers, timeout=120)
    path = f"/admin/adapters/{model}/{action}"
    return httpx.post(server.url + path, headers=headers, timeout=300)


def listing(server: RunningServer) -> dict:
    response = admin(server, "")
    assert response.status_code == 200, response.text
    return response.json()


def loaded(server: RunningServer) -> dict[str, str]:
    """Version -> residency, after checking that the engine holds exactly those versions."""
    body = listing(server)
    residency = {row["version"]: row["residency"] for row in body["loaded"]}
    assert sorted(residency) == body["engine"], body
    return residency


def complete(server: RunningServer, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "prompt": "The sea is", "max_tokens": 4, "temperature": 0, **extra}
    return httpx.post(server.url + "/v1/completions", json=body, timeout=300)


@pytest.fixture(autouse=True)
def empty_cache(server: RunningServer) -> Iterator[None]:
    """Each test starts with no adapter loaded (versions a replaced folder no longer
    names stay until evicted)."""
    for name in GOOD:
        assert admin(server, "unload", name).status_code == 200
    yield


def test_a_failed_load_is_remembered(server: RunningServer, bystander: Bystander) -> None:
    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda _: complete(server, "bigrank"), range(50)))
    assert {r.status_code for r in responses} == {409}
    messages = {r.json()["error"]["message"] for r in responses}
    assert len(messages) == 1, messages
    (message,) = messages
    assert "rank 32 exceeds the server's maximum LoRA rank 16" in message
    # The folder source refuses it before the engine (0 attempts); a refusal only the engine
    # finds is remembered after one attempt. Either way 50 requests cost at most one load.
    failed = [f for f in listing(server)["failed"] if f["version"].startswith("bigrank@")]
    assert all(f["error"] == message for f in failed)
    assert sum(f["engine_attempts"] for f in failed) <= 1
    assert server.log_path.read_text().count("engine: loading adapter bigrank@") <= 1
    assert complete(server, "good1").status_code == 200  # a valid adapter still loads
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


def test_bad_shapes_are_refused_at_load_and_odd_requests_never_fail(
    server: RunningServer, bystander: Bystander
) -> None:
    refused = complete(server, "badshape")
    assert refused.status_code == 409
    message = refused.json()["error"]["message"]
    assert "has shape [8, 575], the base model needs [8, 576]" in message
    assert not any(v.startswith("badshape@") for v in loaded(server))

    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "n": 2}
    odd = [
        ("/v1/completions", {"model": "good1", "prompt": ["a", "b c", "d", "e f g"], "n": 2}),
        ("/v1/completions", {"model": "good2", "prompt": "x", "n": 3, "stream": True}),
        ("/v1/completions", {"model": BASE, "prompt": ["one", "two", "three"], "n": 1}),
        ("/v1/chat/completions", {"model": "good1", **chat}),
        ("/v1/chat/completions", {"model": "good2", **chat, "stream": True}),
        ("/v1/completions", {"model": "good2", "prompt": "y" * 300, "n": 4}),
    ]

    def send(route: str, body: dict) -> httpx.Response:
        payload = {"max_tokens": 6, "temperature": 0.8, "seed": 1, **body}
        return httpx.post(server.url + route, json=payload, timeout=300)

    for _ in range(2):
        with ThreadPoolExecutor(len(odd)) as pool:
            responses = list(pool.map(lambda pair: send(*pair), odd))
        for (route, body), response in zip(odd, responses, strict=True):
            assert response.status_code == 200, (route, body, response.text[:300])
            assert '"error"' not in response.text, response.text[:300]
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


def test_concurrent_load_unload_pin_end_with_the_engine_agreeing(
    server: RunningServer, bystander: Bystander
) -> None:
    rng = random.Random(7)
    for model in ("good1", "good2"):
        actions = [rng.choice(["load", "unload", "pin"]) for _ in range(50)]
        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(admin, [server] * 50, actions, [model] * 50))
        assert {r.status_code for r in statuses} == {200}, [r.text for r in statuses][:3]
        loaded(server)  # the server's residency equals what the engine holds
    last = admin(server, "unload", "good1").json()
    assert last["unloaded"] is True
    assert last["adapter"] not in loaded(server)


def stream_all(server: RunningServer, model: str, count: int) -> tuple[list, threading.Event]:
    """Start ``count`` long streams; return their results (filled as they end) and an event
    set once every stream has received its first token."""
    results: list[tuple[int, str, str]] = []
    started = threading.Semaphore(0)
    all_started = threading.Event()
    body = {"model": model, "prompt": "Once", "max_tokens": 96, "ignore_eos": True}

    def one() -> None:
        payload = {**body, "stream": True, "temperature": 0}
        with httpx.stream("POST", server.url + "/v1/completions", json=payload, timeout=300) as r:
            text, first = "", True
            for line in r.iter_lines():
                text += line + "\n"
                if first and line.startswith("data:"):
                    first = False
                    started.release()
            results.append((r.status_code, r.headers.get("x-loraplex-adapter", ""), text))

    def watch() -> None:
        for _ in range(count):
            started.acquire()
        all_started.set()

    for target in [one] * count + [watch]:
        threading.Thread(target=target, daemon=True).start()
    return results, all_started


def wait_finished(results: list, count: int) -> None:
    for _ in range(600):
        if len(results) == count:
            return
        threading.Event().wait(0.5)
    raise AssertionError(f"only {len(results)} of {count} streams ended")


def assert_finished_on(results: list, version: str) -> None:
    for status, served_by, text in results:
        assert status == 200 and served_by == version, (status, served_by, text[-300:])
        assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text, text[-300:]


def test_unload_with_streams_in_flight(server: RunningServer, bystander: Bystander) -> None:
    version = admin(server, "load", "good2").json()["adapter"]
    results, all_started = stream_all(server, "good2", 20)
    assert all_started.wait(300), "the streams did not start"
    unload = admin(server, "unload", "good2").json()
    assert unload["streams_finishing"] > 0
    assert loaded(server).get(version) == "unloading"
    wait_finished(results, 20)
    assert_finished_on(results, version)
    for _ in range(60):
        if version not in loaded(server):
            break
        threading.Event().wait(0.5)
    assert version not in loaded(server)


def test_replace_with_streams_in_flight(
    server: RunningServer, bystander: Bystander, folder: Path
) -> None:
    old = admin(server, "load", "swap").json()["adapter"]
    results, all_started = stream_all(server, "swap", 20)
    assert all_started.wait(300), "the streams did not start"
    replacement = folder / "swap-next.safetensors"
    shutil.copyfile(folder / "good4" / WEIGHTS_FILE, replacement)
    replacement.replace(folder / "swap" / WEIGHTS_FILE)
    new = complete(server, "swap")
    assert new.status_code == 200 and new.headers["x-loraplex-adapter"] not in ("", old)
    wait_finished(results, 20)
    assert_finished_on(results, old)
    loaded(server)


def test_the_cache_is_bounded_in_bytes_and_pins(
    server: RunningServer, bystander: Bystander
) -> None:
    evicted = metric_sum(server.url, "loraplex_adapter_cache_evictions_total", ADMIN_KEY)
    versions = {}
    for name in ("good1", "good2", "good3", "good4"):
        response = admin(server, "load", name)
        assert response.status_code == 200, response.text
        versions[name] = response.json()["adapter"]
        assert len(loaded(server)) <= 2  # 20 MiB hold two ~9.3 MiB adapters: LRU eviction
    assert set(loaded(server)) == {versions["good3"], versions["good4"]}
    assert "engine: evicting adapter" in server.log_path.read_text()
    assert (
        metric_sum(server.url, "loraplex_adapter_cache_evictions_total", ADMIN_KEY) >= evicted + 2
    )

    for name in ("good3", "good4"):
        assert admin(server, "pin", name).status_code == 200
    full = complete(server, "good1")
    assert full.status_code == 503 and full.headers.get("retry-after")
    assert "adapter cache is full" in full.json()["error"]["message"]
    too_many = admin(server, "pin", "good1")
    assert too_many.status_code == 409
    assert "2 adapters are pinned" in too_many.json()["error"]["message"]
    assert "MAX_PINNED_ADAPTERS=2" in too_many.json()["error"]["message"]

    assert admin(server, "unload", "good3").status_code == 200
    assert complete(server, "good1").status_code == 200
    assert loaded(server) == {versions["good4"]: "pinned", versions["good1"]: "cpu"}
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
