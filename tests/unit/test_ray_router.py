"""The Ray router's routing key: the version ``model`` names now in the registry, "" for the
base model and for anything the replica must answer (unknown, malformed, not JSON). Its relay
of a replica's response: a replica that stops mid-stream ends an event stream with an error
event and ``[DONE]``, and cuts any other body short (tests/integration/test_ray_serve.py
kills a real replica)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ray.exceptions import ActorDiedError

from loraplex.config import Settings
from loraplex.registry.basedims import BaseDims
from loraplex.registry.registry import Registry
from loraplex.server.ray_router import VersionResolver, body_of, routing_key
from loraplex.testing.random_adapters import write_random_adapter


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_routing_key_follows_the_registry(
    registry: Registry, tiny_dims: BaseDims, tmp_path: Path
) -> None:
    for seed in (1, 2):
        registry.push(write_random_adapter(tmp_path / f"s{seed}", tiny_dims, seed=seed), "sales")
    url = f"sqlite:///{tmp_path / 'registry-0' / 'reg.db'}"  # the ``registry`` fixture's
    resolver = VersionResolver(Settings(home=tmp_path, registry_url=url, served_model_name="base"))
    key = lambda path, data: routing_key(path, data, resolver)  # noqa: E731
    assert key("/v1/completions", body(model="sales")) == "sales@v1"
    assert key("/v1/chat/completions", body(model="sales@v2")) == "sales@v2"
    assert key("/generate", body(lora_name="sales")) == "sales@v1"
    registry.promote("sales@v2")
    assert key("/v1/completions", body(model="sales")) == "sales@v2"  # no stale cache
    for path, data in [
        ("/v1/completions", body(model="base")),
        ("/v1/completions", body(model="nope")),
        ("/v1/completions", body(model="../etc")),
        ("/v1/completions", body(model=3)),
        ("/v1/completions", b"{not json"),
        ("/v1/completions", b"[1]"),
        ("/v1/models", body(model="sales")),
    ]:
        assert key(path, data) == "", (path, data)


def test_folder_adapters_are_keyed_by_name(tmp_path: Path) -> None:
    resolver = VersionResolver(Settings(home=tmp_path, adapters_dir=tmp_path))
    assert routing_key("/v1/completions", body(model="pirate"), resolver) == "pirate"


class DyingReplica:
    """A replica's response messages (two body chunks), then its death."""

    def __init__(self) -> None:
        self.cancelled = False

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        for chunk in (b"data: 1\n\n", b"data: 2\n\n"):
            yield {"type": "http.response.body", "body": chunk, "more_body": True}
        raise ActorDiedError()

    def cancel(self) -> None:
        self.cancelled = True


async def relayed(messages: DyingReplica, event_stream: bool) -> list[bytes]:
    return [chunk async for chunk in body_of(messages, event_stream)]  # type: ignore[arg-type]


def test_a_stream_cut_by_the_replica_ends_with_an_error_event() -> None:
    messages = DyingReplica()
    chunks = asyncio.run(relayed(messages, event_stream=True))
    assert chunks[:2] == [b"data: 1\n\n", b"data: 2\n\n"]
    events = b"".join(chunks[2:]).decode().strip().split("\n\n")
    error = json.loads(events[0].removeprefix("data: "))["error"]
    assert error["code"] == "unavailable" and error["type"] == "server_error"
    assert events[1:] == ["data: [DONE]"]
    assert not messages.cancelled


def test_another_body_cut_by_the_replica_fails() -> None:
    with pytest.raises(ActorDiedError):
        asyncio.run(relayed(DyingReplica(), event_stream=False))
