"""Bad input against a real server (reliability checklist cases 1-8, issue 11 item 7).

One server, auth on, over an adapters folder built here: ``good`` (a random rank-8 adapter)
and one bad adapter per case, each a copy of ``good`` with one thing spoiled; beside the
folder, ``outside/evil`` is a valid adapter that nothing may read. A bystander tenant sends
good requests the whole time; the last test asserts it saw no error. Covered: names that try
to be paths, source URLs (no route takes one: the route table is enumerated), a pickle
payload, hostile safetensors, adapters that do not fit the base, unknown adapters, request
caps, and the key every route needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import pickle
import re
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from fastapi.routing import APIRoute
from safetensors.numpy import load_file, save_file

from loraplex.adapters import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE
from loraplex.config import Settings
from loraplex.registry.registry import open_accounts
from loraplex.server.app import create_app
from loraplex.testing.bystander import Bystander
from loraplex.testing.launcher import TEST_BASE_NAME, RunningServer, loraplex_server, server_env

pytestmark = pytest.mark.integration
BASE = TEST_BASE_NAME
ADMIN_KEY = "inputs-admin-key"
CAPS = {
    "max_tokens_limit": 64,
    "max_n": 2,
    "max_prompts": 4,
    "max_prompt_tokens": 256,
    "max_request_bytes": 20_000,
    "max_header_bytes": 8192,
}
A_TENSOR = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"  # rank 8 x 576


# ---- the adapters folder: one spoiled copy of ``good`` per case


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, **changes}))


def _edit_tensors(folder: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> None:
    tensors = load_file(folder / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})


def _raw_weights(folder: Path, header: dict, data: bytes, length: int | None = None) -> None:
    body = json.dumps(header).encode()
    prefix = struct.pack("<Q", len(body) if length is None else length)
    (folder / WEIGHTS_FILE).write_bytes(prefix + body + data)


def _f32(shape: list[int], start: int, end: int) -> dict[str, Any]:
    return {"dtype": "F32", "shape": shape, "data_offsets": [start, end]}


class _OpenOnUnpickle:
    """A pickle ``__reduce__`` payload: unpickling it creates (opens for writing) ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _add_pickle(folder: Path, sentinel: Path, keep_weights: bool) -> None:
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({A_TENSOR: _OpenOnUnpickle(sentinel)}))
    if not keep_weights:
        (folder / WEIGHTS_FILE).unlink()


def _nan(tensors: dict[str, np.ndarray]) -> None:
    tensors[A_TENSOR][0, 0] = np.nan


def _lm_head(tensors: dict[str, np.ndarray]) -> None:
    tensors["base_model.model.lm_head.lora_A.weight"] = np.zeros((8, 576), np.float32)
    tensors["base_model.model.lm_head.lora_B.weight"] = np.zeros((49153, 8), np.float32)


Spoil = Callable[[Path, Path], None]  # (adapter folder, sentinel path)
BAD: dict[str, tuple[Spoil, int, str, str]] = {
    # case 3: pickles are never opened
    "pickle-too": (
        lambda f, s: _add_pickle(f, s, keep_weights=True),
        400,
        "invalid_adapter",
        "holds pickle weights (adapter_model.bin); loraplex never unpickles",
    ),
    "pickle-only": (
        lambda f, s: _add_pickle(f, s, keep_weights=False),
        400,
        "invalid_adapter",
        "holds pickle weights (adapter_model.bin); loraplex never unpickles",
    ),
    # case 4: hostile safetensors
    "header-2-63": (
        lambda f, _: _raw_weights(f, {}, b"", length=2**63),
        400,
        "invalid_adapter",
        "header length 9223372036854775808 exceeds the 16777216-byte limit",
    ),
    "overlap": (
        lambda f, _: _raw_weights(
            f,
            {A_TENSOR: _f32([8, 576], 0, 18432), "x": _f32([8, 576], 0, 18432)},
            b"\0" * 18432,
        ),
        400,
        "invalid_adapter",
        "overlaps another tensor",
    ),
    "dtype-shape": (
        lambda f, _: _raw_weights(f, {A_TENSOR: _f32([8, 576], 0, 100)}, b"\0" * 100),
        400,
        "invalid_adapter",
        "of shape [8, 576] F32 needs 18432 bytes, its offsets span 100",
    ),
    # case 5: adapters that do not fit (409: incompatible with the base, per the HTTP contract)
    "rank-32": (
        lambda f, _: _edit_config(f, r=32),
        409,
        "adapter_incompatible",
        "Adapter rank 32 exceeds the server's maximum LoRA rank 16",
    ),
    "conv-module": (
        lambda f, _: _edit_config(f, target_modules=["q_proj", "conv1d"]),
        409,
        "adapter_incompatible",
        "Target module 'conv1d' does not exist in the base model",
    ),
    "vocab": (
        lambda f, _: _edit_tensors(f, _lm_head),
        409,
        "adapter_incompatible",
        "adapts lm_head, which the base model does not have",
    ),
    "other-base": (
        lambda f, _: (f / MANIFEST_FILE).write_text(json.dumps({"base_fingerprint": "0" * 64})),
        409,
        "adapter_incompatible",
        "trained on a different base model (fingerprint 000000000000)",
    ),
    "dora": (
        lambda f, _: _edit_config(f, use_dora=True),
        400,
        "invalid_adapter",
        "adapter_config.json uses DoRA, which vLLM cannot serve",
    ),
    "bias": (
        lambda f, _: _edit_config(f, bias="lora_only"),
        400,
        "invalid_adapter",
        "adapter_config.json has bias != 'none', which vLLM cannot serve",
    ),
    "modules-to-save": (
        lambda f, _: _edit_config(f, modules_to_save=["lm_head"]),
        400,
        "invalid_adapter",
        "uses modules_to_save (extra full layers), which vLLM cannot serve",
    ),
    "nan": (
        lambda f, _: _edit_tensors(f, _nan),
        400,
        "invalid_adapter",
        f"Tensor '{A_TENSOR}' contains NaN or Inf values (1 such)",
    ),
}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("inputs-home")


@pytest.fixture(scope="module")
def sentinel(home: Path) -> Path:
    """The file the pickle payloads would create if anything unpickled them."""
    return home / "unpickled"


@pytest.fixture(scope="module")
def adapters(home: Path, sentinel: Path, make_random_adapter: Callable[..., Path]) -> Path:
    root = home / "adapters"
    good = make_random_adapter(root / "good", seed=41)
    evil = make_random_adapter(home / "outside" / "evil", seed=42)
    make_random_adapter(home / "spare" / "other", seed=43)
    for name, (spoil, *_) in BAD.items():
        shutil.copytree(good, root / name)
        spoil(root / name, sentinel)
    (root / "link-out").symlink_to(evil, target_is_directory=True)
    (root / "sneaky").mkdir()
    shutil.copy(good / CONFIG_FILE, root / "sneaky")
    (root / "sneaky" / WEIGHTS_FILE).symlink_to(evil / WEIGHTS_FILE)
    return root


@pytest.fixture(scope="module")
def keys(home: Path) -> Iterator[dict[str, str]]:
    """One key each for the tenants ``steady`` (the bystander) and ``acme``."""
    accounts = open_accounts(Settings(home=home))
    made = {}
    for tenant in ("steady", "acme"):
        accounts.create_tenant(tenant)
        made[tenant] = accounts.create_key(tenant)[1]
    yield made
    accounts.close()


@pytest.fixture(scope="module")
def server(
    home: Path, base_model_dir: Path, adapters: Path, keys: dict[str, str]
) -> Iterator[RunningServer]:
    env = server_env(
        home, base_model_dir, adapters_dir=adapters, auth="on", admin_key=ADMIN_KEY, **CAPS
    )
    with loraplex_server(home / "server.log", env=env) as running:
        yield running


@pytest.fixture(scope="module")
def background(server: RunningServer, keys: dict[str, str]) -> Iterator[Bystander]:
    with Bystander(server.url, ["good", BASE], key=keys["steady"]) as load:
        yield load


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def completion(model: str, **extra: object) -> dict[str, Any]:
    return {"model": model, "prompt": "The sea is", "max_tokens": 4, "temperature": 0, **extra}


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def call(
    server: RunningServer, method: str, path: str, key: str | None, body: Any = None
) -> httpx.Response:
    return httpx.request(method, server.url + path, json=body, headers=bearer(key), timeout=120)


def error_of(response: httpx.Response, status: int, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert code is None or error["code"] == code, error
    assert "x-loraplex-adapter" not in response.headers
    return error["message"]


# ---- case 1: names are never paths


@pytest.mark.parametrize(
    "model",
    [
        "../outside/evil",
        "..",
        "/etc",
        "/etc/passwd",
        "%2e%2e",
        "%2e%2e%2foutside%2fevil",
        "good\x00",
        "good\x00/../../outside/evil",
        "good/../good",
        "GOOD",
        "link-out",
        "sneaky",
    ],
)
def test_names_that_try_to_be_paths_are_404(server, keys, background, model: str) -> None:
    acme = keys["acme"]
    error_of(call(server, "POST", "/v1/chat/completions", acme, chat(model)), 404)
    generate = {"prompt": "Hi", "lora_name": model, "max_tokens": 4}
    error_of(call(server, "POST", "/generate", acme, generate), 404)
    load = call(server, "POST", f"/admin/adapters/{quote(model, safe='')}/load", ADMIN_KEY)
    assert load.status_code == 404, load.text


def test_nothing_outside_the_root_was_read(server, keys, home: Path, background) -> None:
    """No snapshot (what the server copies before any check) holds the outside adapter."""
    served = call(server, "POST", "/v1/completions", keys["acme"], completion("good"))
    assert served.status_code == 200, served.text
    evil = hashlib.sha256((home / "outside" / "evil" / WEIGHTS_FILE).read_bytes()).digest()
    copied = [p for p in (home / "cache" / "folder-adapters").rglob("*") if p.is_file()]
    assert copied and all(hashlib.sha256(p.read_bytes()).digest() != evil for p in copied)


# ---- cases 2 and 8: every route, its inputs, and the key it needs


# The console's page and its script and style hold no data: it asks for the admin key.
PUBLIC = {"/health", "/ready", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
PUBLIC |= {"/ui", "/ui/{name}"}
# Chat and completions declare every OpenAI field so that one they do not honour is a 400
# naming it (docs/openai.md); none of them names a file, a URL or an adapter source.
ROUTE_INPUTS = {
    ("POST", "/v1/completions"): {
        *("model", "prompt", "suffix", "max_tokens", "n", "best_of", "echo", "logprobs"),
        *("temperature", "top_p", "top_k", "min_p", "stop", "seed", "ignore_eos"),
        *("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias"),
        *("stream", "stream_options", "user"),
    },
    ("POST", "/v1/chat/completions"): {
        *("model", "messages", "max_tokens", "max_completion_tokens", "n"),
        *("temperature", "top_p", "top_k", "min_p", "stop", "seed", "ignore_eos"),
        *("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias"),
        *("logprobs", "top_logprobs", "response_format", "stream", "stream_options", "user"),
        *("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call"),
        *("audio", "modalities", "prediction", "web_search_options", "reasoning_effort"),
        *("metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"),
        "verbosity",
    },
    ("POST", "/generate"): {"lora_name", "prompt", "max_tokens", "temperature"},
    ("GET", "/v1/models"): set(),
    ("GET", "/v1/models/{model:path}"): {"model"},
    ("GET", "/health"): set(),
    ("GET", "/ready"): set(),
    ("GET", "/metrics"): set(),
    ("GET", "/ui"): set(),
    ("GET", "/ui/{name}"): {"name"},  # a fixed list of three package files
    ("POST", "/admin/adapters/{model}/load"): {"model"},
    ("POST", "/admin/adapters/{model}/unload"): {"model"},
    ("POST", "/admin/adapters/{model}/pin"): {"model"},
    ("GET", "/admin/adapters"): set(),
    ("GET", "/admin/usage"): {"since", "until"},
    ("GET", "/admin/console"): set(),
    ("GET", "/openapi.json"): set(),
    ("GET", "/docs"): set(),
    ("GET", "/docs/oauth2-redirect"): set(),
    ("GET", "/redoc"): set(),
}
"""Every route the app exposes and every input it reads (body fields, path and query).
A new route or input fails ``test_the_route_table``: check that it cannot carry a URL or a
path to fetch, and which key it needs, then add it here."""
ADAPTER_INPUTS = {"model", "lora_name"}
"""The only inputs that name an adapter; each is parsed as ``N``, ``N@vK`` or ``N:alias``."""
VALID_BODIES = {
    "/v1/completions": completion(BASE),
    "/v1/chat/completions": chat(BASE),
    "/generate": {"prompt": "Hi", "max_tokens": 4},
}


def route_table(home: Path, adapters: Path) -> dict[tuple[str, str], set[str]]:
    """``(method, path) -> input names`` of the app ``loraplex serve`` runs (HEAD left out)."""
    app = create_app(Settings(home=home, adapters_dir=adapters, auth="on"))
    table: dict[tuple[str, str], set[str]] = {}
    for route in app.routes:
        inputs: set[str] = set()
        if isinstance(route, APIRoute):
            found = route.dependant
            for kind in ("path_params", "query_params", "header_params", "cookie_params"):
                inputs |= {field.name for field in getattr(found, kind)}
            for field in found.body_params:
                inputs |= set(field.field_info.annotation.model_fields)
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method != "HEAD":
                table[(method, route.path)] = inputs
    return table


def test_the_route_table(home: Path, adapters: Path) -> None:
    assert route_table(home, adapters) == ROUTE_INPUTS


class Egress:
    """A local listener that counts the connections a server makes to it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def egress() -> Iterator[Egress]:
    listener = Egress()
    yield listener
    listener.close()


def test_no_input_takes_a_source_url(server, keys, background, egress: Egress) -> None:
    """Case 2: URLs in every input that names an adapter are unknown models (404), URLs in
    fields loraplex does not know are 400s naming the field, and the server connects
    nowhere."""
    urls = [
        egress.url + "/adapter",
        "http://169.254.169.254/latest/meta-data/",
        "file:///etc/passwd",
        "s3://bucket/adapter",
        "hf://org/adapter",
        egress.url,
    ]
    acme = keys["acme"]
    for url in urls:
        for (method, path), inputs in ROUTE_INPUTS.items():
            for name in inputs & ADAPTER_INPUTS:
                if "{model" in path:
                    where = re.sub(r"\{model(:path)?\}", quote(url, safe=""), path)
                    response = call(server, method, where, ADMIN_KEY)
                else:
                    response = call(server, method, path, acme, {**VALID_BODIES[path], name: url})
                assert response.status_code == 404, (path, name, response.text)
                assert "x-loraplex-adapter" not in response.headers
        sources = {
            "source": url,
            "url": url,
            "lora_path": url,
            "adapter_path": url,
            "lora_modules": [{"name": "x", "path": url}],
        }
        for path in ("/v1/completions", "/v1/chat/completions", "/generate"):
            response = call(server, "POST", path, acme, {**VALID_BODIES[path], **sources})
            error_of(response, 400)
            assert response.json()["error"]["param"] in sources
            assert "x-loraplex-adapter" not in response.headers
        error_of(call(server, "GET", f"/admin/usage?since={quote(url)}", ADMIN_KEY), 400)
    time.sleep(1)
    assert egress.connections == 0


def test_every_route_needs_a_key(server, keys, background, home: Path, adapters: Path) -> None:
    """Case 8: with auth on, every route but the probes and the API docs answers 401 without
    a valid key, and admin routes answer 403 to a tenant's key."""
    for method, path in route_table(home, adapters):
        url = path.replace("{model}", "good").replace("{model:path}", "good")
        url = url.replace("{name}", "console.js")
        body = VALID_BODIES.get(path)
        for key in (None, "wrong", "lpx-00000000-" + "a" * 32):
            status = call(server, method, url, key, body).status_code
            assert status == (200 if path in PUBLIC else 401), (method, path, key, status)
        if path.startswith("/admin/"):
            error_of(call(server, method, url, keys["acme"], body), 403, "forbidden")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/invocations"),
        ("POST", "/v1/load_lora_adapter"),
        ("POST", "/v1/unload_lora_adapter"),
        ("POST", "/v2/models/good/infer"),
        ("POST", "/v1/models/good:predict"),
        ("GET", "/admin/adapters/good/load"),
        ("PUT", "/admin/adapters/good/load"),
        ("POST", "/admin/adapters/good/../../v1/load_lora_adapter"),
    ],
)
def test_no_alternate_load_route(server, keys, background, method: str, path: str) -> None:
    """Case 8: the load and unload routes of vLLM, KServe and SageMaker do not exist here,
    even with the admin key."""
    body = {"lora_name": "evil", "lora_path": "/tmp"}
    assert call(server, method, path, ADMIN_KEY, body).status_code in (404, 405)


# ---- cases 3, 4, 5: adapters that are refused before the engine sees them


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_adapter_is_refused_alone(server, keys, background, name: str) -> None:
    _, status, code, message = BAD[name]
    for path, key, body in [
        ("/v1/chat/completions", keys["acme"], chat(name)),
        ("/v1/completions", keys["acme"], completion(name)),
        (f"/admin/adapters/{name}/load", ADMIN_KEY, None),
    ]:
        refused = error_of(call(server, "POST", path, key, body), status, code)
        assert refused.startswith(f"Adapter '{name}' is refused: ") and message in refused
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    assert (
        call(server, "POST", "/v1/completions", keys["acme"], completion("good")).status_code == 200
    )


def test_the_pickle_payloads_never_ran(server, background, sentinel: Path, tmp_path: Path) -> None:
    """Case 3: the payload is live (unpickling a copy creates its file) yet no request made
    the server unpickle it; this torch would only load weights anyway."""
    import torch

    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_OpenOnUnpickle(probe))).close()
    assert probe.exists() and not sentinel.exists()
    assert tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 10)


def test_fifty_invalid_loads_then_a_valid_one(server, keys, background, adapters: Path) -> None:
    """Case 15 for an adapters folder: each refusal is remembered, and a new valid adapter
    (copied in afterwards) still loads and serves."""

    async def fifty() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            names = sorted(BAD) * 4
            return await asyncio.gather(
                *(
                    client.post(f"/admin/adapters/{name}/load", headers=bearer(ADMIN_KEY))
                    for name in names[:50]
                )
            )

    assert {r.status_code for r in asyncio.run(fifty())} <= {400, 409}
    shutil.copytree(adapters / "good", adapters / "late")
    _edit_config(adapters / "late", lora_alpha=8)
    load = call(server, "POST", "/admin/adapters/late/load", ADMIN_KEY)
    assert load.status_code == 200 and load.json()["adapter"].startswith("late@sha-"), load.text
    served = call(server, "POST", "/v1/completions", keys["acme"], completion("late"))
    assert served.headers["x-loraplex-adapter"] == load.json()["adapter"]


def test_editing_a_folder_gives_a_new_version(
    server, keys, background, adapters: Path, home: Path
) -> None:
    """Item 7: what is served is a snapshot by content, so replacing the files serves a new
    version under a new key, and the old key no longer resolves."""
    swap = adapters / "swap"
    shutil.copytree(adapters / "good", swap)
    first = call(server, "POST", "/v1/completions", keys["acme"], completion("swap"))
    assert first.status_code == 200, first.text
    old = first.headers["x-loraplex-adapter"]
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy(home / "spare" / "other" / file, swap / file)
    second = call(server, "POST", "/v1/completions", keys["acme"], completion("swap"))
    assert second.status_code == 200 and second.headers["x-loraplex-adapter"] != old
    error_of(call(server, "POST", "/v1/completions", keys["acme"], completion(old)), 404)


# ---- case 6: unknown adapters; case 7: request caps


@pytest.mark.parametrize("model", ["nope", "good@v1", "good@sha-000000000000", "good:stable"])
def test_unknown_adapter_is_404_never_base(server, keys, background, model: str) -> None:
    error_of(call(server, "POST", "/v1/completions", keys["acme"], completion(model)), 404)


@pytest.mark.parametrize(
    ("extra", "status", "message"),
    [
        ({"max_tokens": 65}, 400, "max_tokens is 65; the limit is 64"),
        ({"n": 3, "temperature": 0.7}, 400, "n is 3; the limit is 2"),
        ({"prompt": ["a", "b", "c", "d", "e"]}, 400, "has 5 prompts; the limit is 4"),
        ({"prompt": "word " * 300}, 400, "the limit is 256"),
        ({"prompt": "word " * 5000}, 413, "the limit is 20000"),
    ],
)
def test_request_caps(server, keys, background, extra: dict, status: int, message: str) -> None:
    body = completion(BASE, **extra)
    assert message in error_of(call(server, "POST", "/v1/completions", keys["acme"], body), status)


def test_costly_fields_are_400_naming_them(server, keys, background) -> None:
    """best_of, logprobs and prompt_logprobs past what loraplex honours reach no engine: 400
    naming the field (logprobs is bounded by max_logprobs; prompt_logprobs is not OpenAI's)."""
    for field in ("best_of", "logprobs", "prompt_logprobs"):
        body = completion(BASE, **{field: 10_000})
        response = call(server, "POST", "/v1/completions", keys["acme"], body)
        assert field in error_of(response, 400, "invalid_request")
        assert response.json()["error"]["param"] == field


def test_headers_over_the_cap(server, keys, background) -> None:
    """A head over the cap is 413 from the app; one far over it is cut off by the HTTP
    parser (400, connection closed) before it is buffered whole."""
    headers = {**bearer(keys["acme"]), "x-big": "a" * 9000}
    response = httpx.post(
        server.url + "/v1/completions", json=completion(BASE), headers=headers, timeout=120
    )
    assert "the limit is 8192" in error_of(response, 413, "too_large")
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4_000_000 + b"\r\n\r\n"
        with contextlib.suppress(ConnectionError):  # it may close while we still send
            conn.sendall(head)
        assert conn.recv(64).startswith(b"HTTP/1.1 400")
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


def test_the_bystander_saw_no_errors(background: Bystander) -> None:
    background.wait_sent(10)
    background.assert_clean(min_sent=10)
