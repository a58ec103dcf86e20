"""Pure logic of serving: LoRA id allocation, request schemas, fallback."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from loraplex.adapters import ResolvedAdapter
from loraplex.config import Settings
from loraplex.engine.lora_ids import LoraIdAllocator
from loraplex.errors import IncompatibleAdapter, InvalidRequest
from loraplex.server.metrics import Metrics
from loraplex.server.schemas import ChatCompletionRequest, CompletionRequest
from loraplex.server.service import Service, new_request_id
from loraplex.server.usage import UsageRecorder


def test_lora_ids_unique_and_stable_across_threads() -> None:
    ids = LoraIdAllocator()
    seen: list[int] = []
    threads = [
        threading.Thread(target=lambda i=i: seen.append(ids.id_for(f"a@v{i % 50}")))
        for i in range(200)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted({ids.id_for(f"a@v{i}") for i in range(50)}) == list(range(1, 51))
    assert ids.known("never") is None


def test_request_ids_are_unique() -> None:
    assert len({new_request_id("x") for _ in range(1000)}) == 1000


def test_schemas_validate_bounds() -> None:
    assert CompletionRequest(model="m", prompt="p", stop="x").stop_list() == ["x"]
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="p", stop=["a", "b", "c", "d", "e"])
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[], max_tokens=3)
    with pytest.raises(InvalidRequest, match="greedy sampling has one answer"):
        CompletionRequest(model="m", prompt="p", n=2, temperature=0)
    assert CompletionRequest(model="m", prompt="p", n=2, temperature=0.5).n == 2
    chat = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    )
    assert chat.messages[0].text() == "hi"


class FailingEngine:
    async def load(self, adapter: ResolvedAdapter) -> bool:
        raise IncompatibleAdapter("bad weights")

    async def check_health(self) -> None:
        return None


def test_fallback_only_when_policy_allows_and_labelled() -> None:
    metrics = Metrics()
    service = Service(Settings(), FailingEngine(), None, None, metrics, UsageRecorder(None, 1))  # type: ignore[arg-type]
    allowed = ResolvedAdapter("sales", "sales@v1", Path("/nowhere"), fallback_to_base=True)
    target = asyncio.run(service.target(allowed))
    assert target.fallback and target.adapter is None and target.label == "smollm2-135m"
    assert metrics.fallbacks.labels("sales")._value.get() == 1
    with pytest.raises(IncompatibleAdapter):
        asyncio.run(service.target(dataclasses.replace(allowed, fallback_to_base=False)))
