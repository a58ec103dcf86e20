"""``VllmEngine``'s load/unload/pin logic over a stand-in for ``AsyncLLM`` that behaves like
vLLM's worker where it matters: calls take time, and a step whose request names an adapter
the worker no longer holds loads it again from its path (which is how a careless unload makes
the server and the engine disagree). The real engine runs the same scenarios in
tests/integration/test_engine_hardening.py."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm")

from loraplex.adapters import ResolvedAdapter  # noqa: E402
from loraplex.config import load_settings  # noqa: E402
from loraplex.engine.types import GenerationParams  # noqa: E402
from loraplex.engine.vllm_engine import VllmEngine  # noqa: E402
from loraplex.errors import IncompatibleAdapter  # noqa: E402
from loraplex.registry.basedims import BaseDims  # noqa: E402
from loraplex.testing.random_adapters import write_random_adapter  # noqa: E402


@dataclass
class StandInLLM:
    """The parts of ``AsyncLLM`` the engine uses; ``loras`` is what the worker holds."""

    loras: set[int] = field(default_factory=set)
    adds: list[int] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    async def _delay(self) -> None:
        await asyncio.sleep(self.rng.random() / 1000)

    async def add_lora(self, request: Any) -> bool:
        await self._delay()
        self.adds.append(request.lora_int_id)
        self.loras.add(request.lora_int_id)
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        await self._delay()
        self.loras.discard(lora_id)
        return True

    async def pin_lora(self, lora_id: int) -> bool:
        await self._delay()
        assert lora_id in self.loras, "vLLM refuses to pin an adapter it does not hold"
        return True

    async def list_loras(self) -> set[int]:
        return set(self.loras)

    async def generate(self, prompt, sampling, request_id, lora_request=None) -> AsyncIterator:
        for step in range(3):
            if lora_request is not None:
                self.loras.add(lora_request.lora_int_id)  # the worker reloads from the path
            if step == 1:
                await self.gate.wait()
            choice = SimpleNamespace(
                index=0, text="x", token_ids=[1], finish_reason=None, logprobs=None
            )
            yield SimpleNamespace(outputs=[choice], num_cached_tokens=0)


def make(
    model_dir: Path,
    tmp_path: Path,
    names: list[str],
    llm: StandInLLM | None = None,
    **settings: Any,
):
    dims = BaseDims.from_model_dir(model_dir)
    llm = llm or StandInLLM()
    engine = VllmEngine(load_settings(max_lora_rank=16, **settings), str(model_dir), llm=llm)
    adapters = {}
    for seed, name in enumerate(names):
        folder = write_random_adapter(tmp_path / name, dims, rank=8, seed=seed)
        adapters[name] = ResolvedAdapter(name, f"{name}@v1", folder)
    return engine, llm, adapters


async def agree(engine: VllmEngine) -> None:
    residency, in_engine = await engine.residency_and_engine()
    assert sorted(residency) == in_engine


def test_concurrent_load_unload_pin_end_in_agreement(model_dir: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        engine, llm, adapters = make(model_dir, tmp_path, ["a", "b"])
        llm.gate.set()
        rng = random.Random(1)
        for adapter in adapters.values():
            calls = [getattr(engine, rng.choice(["load", "unload", "pin"])) for _ in range(50)]
            streams = [_drain(engine, adapter) for _ in range(5)]
            await asyncio.gather(*(call(adapter) for call in calls), *streams)
            await asyncio.sleep(0.05)  # removals deferred to the end of streams
            await agree(engine)

    asyncio.run(scenario())


async def _drain(engine: VllmEngine, adapter: ResolvedAdapter) -> list:
    params = GenerationParams(max_tokens=3)
    return [d async for d in engine.stream([1, 2], params, "r", adapter)]


def test_unload_waits_for_streams_in_flight(model_dir: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        engine, llm, adapters = make(model_dir, tmp_path, ["a"])
        a = adapters["a"]
        streams = [asyncio.create_task(_drain(engine, a)) for _ in range(20)]
        await asyncio.sleep(0.05)
        assert await engine.unload(a) == 20
        assert engine.residency() == {"a@v1": "unloading"}
        await agree(engine)
        llm.gate.set()
        assert all(len(s) == 3 for s in await asyncio.gather(*streams))
        await asyncio.sleep(0.05)
        assert engine.residency() == {} and llm.loras == set()

    asyncio.run(scenario())


def test_byte_budget_evicts_and_failed_loads_are_remembered(
    model_dir: Path, tmp_path: Path
) -> None:
    async def scenario() -> None:
        # rank 8 on q_proj and v_proj: ~2 MiB each in fp32; 5 MiB hold two
        engine, llm, adapters = make(model_dir, tmp_path, ["a", "b", "c"], adapter_cache_mb=5)
        for adapter in adapters.values():
            await engine.load(adapter)
        assert sorted(engine.residency()) == ["b@v1", "c@v1"]
        await agree(engine)
        broken = tmp_path / "broken"
        write_random_adapter(broken, BaseDims.from_model_dir(model_dir), rank=32)
        bad = ResolvedAdapter("broken", "broken@v1", broken)
        results = await asyncio.gather(
            *(engine.load(bad) for _ in range(50)), return_exceptions=True
        )
        assert all(isinstance(r, IncompatibleAdapter) for r in results)
        assert len({r.message for r in results}) == 1
        (failure,) = engine.failed_loads()
        assert failure["engine_attempts"] == 1
        assert len(llm.adds) == 3  # the broken adapter never reached the engine

    asyncio.run(scenario())


@dataclass
class CallLog(StandInLLM):
    """A stand-in that logs when each add or remove is sent and when its reply arrives."""

    log: list[tuple[str, str, int]] = field(default_factory=list)

    async def add_lora(self, request: Any) -> bool:
        self.log.append(("sent", "add", request.lora_int_id))
        result = await super().add_lora(request)
        self.log.append(("replied", "add", request.lora_int_id))
        return result

    async def remove_lora(self, lora_id: int) -> bool:
        self.log.append(("sent", "remove", lora_id))
        await asyncio.sleep(0.01)  # a slow reply: the add must not wait for it
        result = await super().remove_lora(lora_id)
        self.log.append(("replied", "remove", lora_id))
        return result


def test_an_eviction_is_sent_before_the_add_in_one_round_trip(
    model_dir: Path, tmp_path: Path
) -> None:
    async def scenario() -> None:
        engine, llm, adapters = make(
            model_dir, tmp_path, ["a", "b", "c"], CallLog(), max_loras=2, max_cpu_loras=2
        )
        for name in ("a", "b"):
            await engine.load(adapters[name])
        llm.log.clear()
        await engine.load(adapters["c"])  # the cache holds two: "a" leaves
        a_id, c_id = engine._ids.known("a@v1"), engine._ids.known("c@v1")
        sent = [entry for entry in llm.log if entry[0] == "sent"]
        assert sent == [("sent", "remove", a_id), ("sent", "add", c_id)]
        # the add went out before the removal's reply, and both replied before load returned
        assert llm.log.index(("sent", "add", c_id)) < llm.log.index(("replied", "remove", a_id))
        assert len(llm.log) == 4
        assert sorted(engine.residency()) == ["b@v1", "c@v1"]
        await agree(engine)

    asyncio.run(scenario())
