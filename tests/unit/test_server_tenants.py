"""Tenants over HTTP with a fake engine: keys, ownership, ``/v1/models``, the admin and metrics
keys, per-tenant limits, server caps, prefix-cache salts, fair admission and usage.

Adapters come from a real registry (SQLite, local blobs, the tiny base) holding ``acme-bot``
(tenant acme), ``globex-bot`` (globex) and ``shared-bot`` (no tenant); the app opens the same
database for tenants, keys and usage, as a server sharing a registry does.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from route_checks import BASE, assert_error, chat, sse_data

from loraplex.adapter_sources import RegistryAdapterSource
from loraplex.errors import Unavailable
from loraplex.registry.basedims import BaseDims
from loraplex.registry.registry import Registry
from loraplex.testing.random_adapters import write_random_adapter

if TYPE_CHECKING:
    from fake_engine import FakeEngine
    from route_checks import Serve

pytestmark = pytest.mark.anyio
ADMIN_KEY = "admin-secret"
METRICS_KEY = "metrics-secret"
OWNERS = {"acme-bot": "acme", "globex-bot": "globex", "shared-bot": None}
TENANTS: dict[str, dict[str, int]] = {
    "acme": {},
    "globex": {},
    "hasty": {"rpm": 2},
    "wordy": {"tpm": 100},
    "single": {"max_concurrency": 1},
}


@pytest.fixture
def owned(registry: Registry, tmp_path: Path, tiny_dims: BaseDims) -> Registry:
    """``registry`` holding the adapters of ``OWNERS`` (v1 each) and the tenants of ``TENANTS``."""
    for seed, (name, tenant) in enumerate(OWNERS.items()):
        folder = write_random_adapter(tmp_path / "src" / name, tiny_dims, seed=seed)
        registry.push(folder, name, tenant=tenant)
    for name, limits in TENANTS.items():
        registry.accounts.create_tenant(name, **limits)
    return registry


@pytest.fixture
def tenants(serve: Serve, owned: Registry) -> Serve:
    """``serve`` with auth on, admin and metrics keys, over ``owned``'s adapters and database."""

    def start(**settings: Any) -> Any:
        url = owned.catalog.engine.url.render_as_string(hide_password=False)
        defaults = {"auth": "on", "admin_key": ADMIN_KEY, "metrics_key": METRICS_KEY}
        return serve(
            source=RegistryAdapterSource(owned), **{**defaults, "registry_url": url, **settings}
        )

    return start


def new_key(registry: Registry, tenant: str) -> str:
    return registry.accounts.create_key(tenant)[1]


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def completion(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": "Hello there", "max_tokens": 8, **extra}


async def eventually(check: Callable[[], bool], seconds: float = 10) -> None:
    """Wait until ``check()`` holds; fail after ``seconds``."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


async def answered(request: Awaitable[httpx.Response]) -> httpx.Response:
    """The response; fails (instead of hanging) if the request is stuck behind a held one."""
    return await asyncio.wait_for(request, 10)


async def still_waiting(task: asyncio.Task[Any], engine: FakeEngine, generations: int) -> None:
    """``task`` stays unfinished and the engine gets no new request for a while."""
    for _ in range(20):
        await asyncio.sleep(0.01)
        assert not task.done() and len(engine.generations) == generations


def retry_after(response: httpx.Response) -> int:
    assert_error(response, 429, "rate_limited")
    return int(response.headers["retry-after"])


# ---- keys decide the tenant

REQUESTS = [
    ("POST", "/v1/completions", completion(BASE)),
    ("POST", "/v1/chat/completions", chat(BASE)),
    ("POST", "/generate", {"prompt": "Hello"}),
    ("GET", "/v1/models", None),
]


@pytest.mark.parametrize(("method", "path", "body"), REQUESTS)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("not-a-key"),
        bearer("lpx-00000000-" + "a" * 32),
        {"authorization": "lpx-00000000-" + "a" * 32},
        bearer(METRICS_KEY),
    ],
)
async def test_requests_without_a_valid_key_are_401(
    tenants: Serve, engine: FakeEngine, method: str, path: str, body: Any, headers: dict
) -> None:
    async with tenants() as client:
        response = await client.request(method, path, json=body, headers=headers)
    assert_error(response, 401, "invalid_api_key")
    assert not engine.generations


async def test_revoked_keys_and_deleted_tenants_are_401(tenants: Serve, owned: Registry) -> None:
    record, key = owned.accounts.create_key("acme")
    globex = new_key(owned, "globex")
    async with tenants(key_cache_seconds=0) as client:
        ok = await client.post("/v1/completions", json=completion(BASE), headers=bearer(key))
        assert ok.status_code == 200
        assert (await client.get("/v1/models", headers=bearer(globex))).status_code == 200
        owned.accounts.revoke_key(record.key_id)
        owned.accounts.delete_tenant("globex")
        for refused in (key, globex):
            response = await client.post(
                "/v1/completions", json=completion(BASE), headers=bearer(refused)
            )
            assert "revoked" in assert_error(response, 401, "invalid_api_key")


# ---- ownership: another tenant's adapter is an unknown one


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    ("theirs", "unknown"),
    [("globex-bot", "ghost-bot"), ("globex-bot@v1", "ghost-bot@v1"), ("globex-bot", "acme-bot@v9")],
)
async def test_another_tenants_adapter_answers_like_an_unknown_one(
    tenants: Serve, owned: Registry, engine: FakeEngine, route: str, theirs: str, unknown: str
) -> None:
    body = completion if route == "/v1/completions" else chat
    headers = bearer(new_key(owned, "acme"))
    async with tenants() as client:
        refused = await client.post(route, json=body(theirs), headers=headers)
        missing = await client.post(route, json=body(unknown), headers=headers)
    assert refused.status_code == missing.status_code == 404
    assert refused.text == missing.text.replace(unknown, theirs)
    assert set(refused.headers) == set(missing.headers)
    assert not engine.generations and not engine.loads


async def test_a_tenant_uses_its_own_and_shared_adapters(
    tenants: Serve, owned: Registry, engine: FakeEngine
) -> None:
    acme, globex = bearer(new_key(owned, "acme")), bearer(new_key(owned, "globex"))
    served = []
    async with tenants() as client:
        for headers, model in [
            (acme, "acme-bot"),
            (acme, "acme-bot@v1"),
            (acme, "shared-bot"),
            (acme, BASE),
            (globex, "globex-bot"),
            (bearer(ADMIN_KEY), "globex-bot"),
            (bearer(ADMIN_KEY), "acme-bot"),
        ]:
            response = await client.post("/v1/completions", json=completion(model), headers=headers)
            assert response.status_code == 200, response.text
            served.append(response.headers["x-loraplex-adapter"])
        lora = await client.post(
            "/generate", json={"prompt": "Hi", "lora_name": "globex-bot"}, headers=acme
        )
    assert served == [
        "acme-bot@v1",
        "acme-bot@v1",
        "shared-bot@v1",
        BASE,
        "globex-bot@v1",
        "globex-bot@v1",
        "acme-bot@v1",
    ]
    assert_error(lora, 404, "model_not_found")


async def test_models_lists_what_the_caller_may_use(
    tenants: Serve, serve: Serve, owned: Registry
) -> None:
    async def listed(client: httpx.AsyncClient, headers: dict[str, str]) -> list[str]:
        response = await client.get("/v1/models", headers=headers)
        return [m["id"] for m in response.json()["data"]]

    async with tenants() as client:
        assert await listed(client, bearer(new_key(owned, "acme"))) == [
            BASE,
            "acme-bot",
            "shared-bot",
        ]
        assert await listed(client, bearer(new_key(owned, "globex"))) == [
            BASE,
            "globex-bot",
            "shared-bot",
        ]
        everything = [BASE, "acme-bot", "globex-bot", "shared-bot"]
        assert await listed(client, bearer(ADMIN_KEY)) == everything
    async with tenants(auth="off") as client:
        assert await listed(client, {}) == everything


# ---- admin routes and /metrics


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/adapters"),
        ("GET", "/admin/usage"),
        ("POST", "/admin/adapters/acme-bot/load"),
    ],
)
async def test_admin_routes_need_the_admin_key(
    tenants: Serve, owned: Registry, engine: FakeEngine, method: str, path: str
) -> None:
    async with tenants() as client:

        async def status(headers: dict[str, str]) -> int:
            return (await client.request(method, path, headers=headers)).status_code

        assert await status({}) == 401
        assert await status(bearer("wrong")) == 401
        assert await status(bearer(METRICS_KEY)) == 401
        tenant = await client.request(method, path, headers=bearer(new_key(owned, "acme")))
        assert_error(tenant, 403, "forbidden")
        assert not engine.loads
        assert await status(bearer(ADMIN_KEY)) == 200


async def test_metrics_need_the_admin_or_metrics_key_with_auth_on(
    tenants: Serve, owned: Registry
) -> None:
    async with tenants() as client:
        await client.post("/v1/completions", json=completion(BASE), headers=bearer(ADMIN_KEY))

        async def metrics(headers: dict[str, str]) -> httpx.Response:
            return await client.get("/metrics", headers=headers)

        assert_error(await metrics({}), 401, "invalid_api_key")
        assert_error(await metrics(bearer("wrong")), 401, "invalid_api_key")
        assert_error(await metrics(bearer(new_key(owned, "acme"))), 403, "forbidden")
        for key in (METRICS_KEY, ADMIN_KEY):
            response = await metrics(bearer(key))
            assert response.status_code == 200 and "loraplex_requests_total" in response.text
    async with tenants(auth="off") as client:
        assert (await client.get("/metrics")).status_code == 200


# ---- per-tenant limits (429) and server caps (400), before any engine work


async def test_requests_per_minute(tenants: Serve, owned: Registry, engine: FakeEngine) -> None:
    hasty = bearer(new_key(owned, "hasty"))
    async with tenants() as client:
        for _ in range(2):
            ok = await client.post("/v1/completions", json=completion(BASE), headers=hasty)
            assert ok.status_code == 200
        refused = await client.post("/v1/chat/completions", json=chat(BASE), headers=hasty)
        other = await client.post(
            "/v1/completions", json=completion(BASE), headers=bearer(new_key(owned, "acme"))
        )
        metrics = (await client.get("/metrics", headers=bearer(ADMIN_KEY))).text
    assert 1 <= retry_after(refused) <= 60
    assert "2 requests per minute" in refused.json()["error"]["message"]
    assert other.status_code == 200 and len(engine.generations) == 3
    limited = 'loraplex_requests_total{adapter="none",route="/v1/chat/completions",'
    assert limited + 'status="429",tenant="hasty"} 1.0' in metrics


async def test_tokens_per_minute(tenants: Serve, owned: Registry, engine: FakeEngine) -> None:
    wordy = bearer(new_key(owned, "wordy"))
    engine.gate = asyncio.Event()
    async with tenants() as client:
        held = asyncio.create_task(
            client.post("/v1/completions", json=completion(BASE, max_tokens=80), headers=wordy)
        )
        await eventually(lambda: len(engine.generations) == 1)
        refused = await answered(
            client.post("/v1/completions", json=completion(BASE, max_tokens=30), headers=wordy)
        )
        engine.gate.set()
        assert (await answered(held)).status_code == 200
        # the held request used a few tokens and gave the rest of its reservation back
        again = await client.post(
            "/v1/completions", json=completion(BASE, max_tokens=30), headers=wordy
        )
        too_big = await client.post(
            "/v1/completions", json=completion(BASE, max_tokens=100), headers=wordy
        )
    assert 1 <= retry_after(refused) <= 60
    assert "100 tokens per minute" in refused.json()["error"]["message"]
    assert again.status_code == 200
    assert "may use in a minute" in assert_error(too_big, 400, "invalid_request")
    assert len(engine.generations) == 2


@pytest.mark.parametrize("stream", [True, False])
async def test_concurrent_requests(
    tenants: Serve, owned: Registry, engine: FakeEngine, stream: bool
) -> None:
    single = bearer(new_key(owned, "single"))
    engine.gate = asyncio.Event()
    async with tenants() as client:
        held = asyncio.create_task(
            client.post("/v1/completions", json=completion(BASE, stream=stream), headers=single)
        )
        await eventually(lambda: len(engine.generations) == 1)
        refused = await answered(
            client.post("/v1/chat/completions", json=chat(BASE), headers=single)
        )
        engine.gate.set()
        assert (await answered(held)).status_code == 200
        after = await client.post("/v1/completions", json=completion(BASE), headers=single)
    assert retry_after(refused) >= 1
    assert "1 requests in progress" in refused.json()["error"]["message"]
    assert after.status_code == 200


CAPS = {"max_tokens_limit": 64, "max_n": 2, "max_prompts": 3, "max_prompt_tokens": 20}


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/completions", completion(BASE, max_tokens=65), "max_tokens is 65; the limit is 64"),
        ("/v1/chat/completions", chat(BASE, max_tokens=65), "max_tokens is 65"),
        ("/generate", {"prompt": "Hi", "max_tokens": 65}, "max_tokens is 65"),
        ("/v1/completions", completion(BASE, n=3), "n is 3; the limit is 2"),
        ("/v1/chat/completions", chat(BASE, n=3), "n is 3; the limit is 2"),
        (
            "/v1/completions",
            completion(BASE, prompt=["a", "b", "c", "d"]),
            "4 prompts; the limit is 3",
        ),
        ("/v1/completions", completion(BASE, prompt="word " * 30), "the limit is 20"),
        ("/v1/completions", completion(BASE, prompt=["a", "word " * 30]), "the limit is 20"),
        (
            "/v1/chat/completions",
            chat(BASE, messages=[{"role": "user", "content": "word " * 30}]),
            "the limit is 20",
        ),
    ],
)
async def test_server_caps_are_400(
    tenants: Serve, owned: Registry, engine: FakeEngine, path: str, body: dict, message: str
) -> None:
    async with tenants(**CAPS) as client:
        response = await client.post(path, json=body, headers=bearer(new_key(owned, "acme")))
    assert message in assert_error(response, 400, "invalid_request")
    assert not engine.generations


# ---- prefix-cache salt


async def test_each_tenant_salts_the_prefix_cache(
    tenants: Serve, owned: Registry, engine: FakeEngine
) -> None:
    async with tenants() as client:
        for tenant in ("acme", "globex"):
            headers = bearer(new_key(owned, tenant))
            await client.post("/v1/completions", json=completion(BASE), headers=headers)
            await client.post(
                "/v1/completions", json=completion(BASE, stream=True), headers=headers
            )
            await client.post("/v1/chat/completions", json=chat("shared-bot"), headers=headers)
            await client.post("/generate", json={"prompt": "Hi"}, headers=headers)
        await client.post("/v1/completions", json=completion(BASE), headers=bearer(ADMIN_KEY))
    async with tenants(auth="off") as client:
        await client.post("/v1/completions", json=completion(BASE))
    salts = [g.params.cache_salt for g in engine.generations]
    assert salts == ["tenant:acme"] * 4 + ["tenant:globex"] * 4 + [None, None]


# ---- fair admission: bounded engine sequences, per-tenant queues, queue deadline


async def test_a_full_engine_queues_other_tenants(
    tenants: Serve, owned: Registry, engine: FakeEngine
) -> None:
    acme, globex = bearer(new_key(owned, "acme")), bearer(new_key(owned, "globex"))
    engine.gate = asyncio.Event()
    async with tenants(max_engine_sequences=1, tenant_queue_size=1) as client:
        held = asyncio.create_task(
            client.post("/v1/completions", json=completion(BASE, stream=True), headers=acme)
        )
        await eventually(lambda: len(engine.generations) == 1)
        queued = asyncio.create_task(
            client.post("/v1/chat/completions", json=chat("globex-bot"), headers=globex)
        )
        await still_waiting(queued, engine, 1)
        full = await answered(client.post("/v1/completions", json=completion(BASE), headers=globex))
        engine.gate.set()
        first, second = await answered(held), await answered(queued)
    assert "1 requests waiting" in full.json()["error"]["message"]
    assert retry_after(full) >= 1
    assert first.status_code == second.status_code == 200
    assert second.headers["x-loraplex-adapter"] == "globex-bot@v1"
    assert len(engine.generations) == 2


async def test_requests_of_the_adapter_in_the_engine_go_first(
    tenants: Serve, owned: Registry, engine: FakeEngine
) -> None:
    """One engine slot: a request of another adapter is held back (up to
    adapter_wait_seconds) while a later request of the adapter in the slot goes in."""
    acme, globex = bearer(new_key(owned, "acme")), bearer(new_key(owned, "globex"))
    engine.gate = asyncio.Event()
    async with tenants(max_loras=1, adapter_wait_seconds=30) as client:

        def ask(model: str, headers: dict[str, str]) -> asyncio.Task[httpx.Response]:
            body = chat(model)
            return asyncio.create_task(
                client.post("/v1/chat/completions", json=body, headers=headers)
            )

        first = ask("acme-bot", acme)
        await eventually(lambda: len(engine.generations) == 1)
        other = ask("globex-bot", globex)
        await still_waiting(other, engine, 1)
        same = ask("acme-bot", acme)
        await eventually(lambda: len(engine.generations) == 2)
        engine.gate.set()
        responses = [await answered(task) for task in (first, other, same)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    served = [g.adapter.name for g in engine.generations if g.adapter is not None]
    assert served == ["acme-bot", "acme-bot", "globex-bot"]


async def test_waiting_past_the_queue_deadline_is_429(
    tenants: Serve, owned: Registry, engine: FakeEngine
) -> None:
    engine.gate = asyncio.Event()
    settings = {"max_engine_sequences": 1, "queue_timeout_seconds": 0.2}
    async with tenants(**settings) as client:
        held = asyncio.create_task(
            client.post("/v1/completions", json=completion(BASE), headers=bearer(ADMIN_KEY))
        )
        await eventually(lambda: len(engine.generations) == 1)
        late = await answered(
            client.post(
                "/v1/completions", json=completion(BASE), headers=bearer(new_key(owned, "globex"))
            )
        )
        engine.gate.set()
        assert (await answered(held)).status_code == 200
        after = await client.post(
            "/v1/completions", json=completion(BASE), headers=bearer(new_key(owned, "globex"))
        )
    assert retry_after(late) >= 1 and "waited" in late.json()["error"]["message"]
    assert after.status_code == 200 and len(engine.generations) == 2


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", completion(BASE)),
        ("/v1/completions", completion(BASE, prompt=["One", "Two two"])),
        ("/v1/chat/completions", chat(BASE)),
        ("/generate", {"prompt": "Hi"}),
        ("/v1/completions", completion(BASE, stream=True)),
    ],
)
async def test_a_failed_generation_frees_its_seat_and_slot(
    tenants: Serve, owned: Registry, engine: FakeEngine, path: str, body: dict
) -> None:
    single = bearer(new_key(owned, "single"))  # max_concurrency 1
    settings = {"max_engine_sequences": 1, "queue_timeout_seconds": 1}
    async with tenants(**settings) as client:
        engine.stream_error, engine.fail_after = Unavailable("engine hiccup"), 1
        failed = await client.post(path, json=body, headers=single)
        engine.stream_error = None
        after = await client.post(path, json=body, headers=single)
    if body.get("stream"):
        assert "engine hiccup" in sse_data(failed)[-2]
    else:
        assert_error(failed, 503, "unavailable")
    assert after.status_code == 200, after.text


async def test_a_failed_prompt_stops_the_other_prompts_of_its_request(
    serve: Serve, engine: FakeEngine
) -> None:
    """The engine must not keep generating what its freed seats no longer count."""
    stream = engine.stream

    def first_prompt_fails(
        prompt_ids: list[int], params: Any, request_id: str, adapter: Any
    ) -> Any:
        if request_id.endswith("-0"):
            raise Unavailable("the first prompt failed")
        return stream(prompt_ids, params, request_id, adapter)

    engine.stream = first_prompt_fails  # type: ignore[method-assign]
    engine.gate = asyncio.Event()  # the second prompt waits in the engine
    async with serve() as client:
        body = completion(BASE, prompt=["One", "Two"])
        failed = await answered(client.post("/v1/completions", json=body))
        metrics = (await client.get("/metrics")).text
        engine.gate.set()
    assert_error(failed, 503, "unavailable")
    assert "loraplex_requests_in_flight 0.0" in metrics


# ---- usage


def usage_of(response: httpx.Response) -> dict[str, int]:
    """The ``usage`` of a JSON response, or of the usage event of an SSE stream."""
    assert response.status_code == 200, response.text
    if response.headers["content-type"].startswith("text/event-stream"):
        events = sse_data(response)
        assert events[-1] == "[DONE]"
        return json.loads(events[-2])["usage"]
    return response.json()["usage"]


async def test_usage_matches_the_responses_and_is_stored_at_shutdown(
    tenants: Serve, owned: Registry
) -> None:
    acme, globex = bearer(new_key(owned, "acme")), bearer(new_key(owned, "globex"))
    include = {"stream": True, "stream_options": {"include_usage": True}}
    traffic = [
        (acme, "/v1/completions", completion(BASE)),
        (acme, "/v1/completions", completion("acme-bot", prompt=["One", "Two two"], n=2)),
        (acme, "/v1/chat/completions", chat("shared-bot", max_tokens=2)),
        (acme, "/v1/chat/completions", chat("shared-bot", n=2)),
        (acme, "/v1/completions", completion("acme-bot", **include)),
        (acme, "/v1/chat/completions", chat(BASE, n=2, **include)),
        (globex, "/v1/completions", completion("globex-bot", max_tokens=1)),
        (globex, "/v1/chat/completions", chat("shared-bot")),
        (bearer(ADMIN_KEY), "/v1/completions", completion("globex-bot")),
    ]
    later = [(globex, "/v1/completions", completion(BASE, **include))]
    tenants_of = {acme["authorization"]: "acme", globex["authorization"]: "globex"}
    expected: dict[tuple[str, str], Counter[str]] = {}

    async def send(client: httpx.AsyncClient, requests: list[tuple[dict, str, dict]]) -> None:
        for headers, path, body in requests:
            response = await client.post(path, json=body, headers=headers)
            usage = usage_of(response)
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            tenant = tenants_of.get(headers["authorization"], "admin")
            row = expected.setdefault((tenant, response.headers["x-loraplex-adapter"]), Counter())
            row.update(
                requests=1,
                prompt_tokens=usage["prompt_tokens"],
                completion_tokens=usage["completion_tokens"],
            )

    def rows() -> list[dict[str, Any]]:
        return [
            {"tenant": tenant, "adapter": adapter, **counts}
            for (tenant, adapter), counts in sorted(expected.items())
        ]

    async with tenants(usage_flush_seconds=3600) as client:
        await send(client, traffic)
        reported = await client.get("/admin/usage", headers=bearer(ADMIN_KEY))
        assert reported.json()["usage"] == rows()
        recent = await client.get("/admin/usage?since=-1h", headers=bearer(ADMIN_KEY))
        assert recent.json()["usage"] == rows()
        written = rows()
        await send(client, later)  # counted in memory: the hourly flush has not come yet
        assert [row.to_dict() for row in owned.accounts.usage()] == written
    assert ("globex", BASE) in expected
    assert [row.to_dict() for row in owned.accounts.usage()] == rows()
