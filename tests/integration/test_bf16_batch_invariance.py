"""A bf16 server: each request's greedy output is the same alone and batched with requests of
other adapters (``fastlora.row_invariance``). Without it 3 of these 8 completions changed.

Eager: with the compiled model 1 of 8 still changes (a second source in the compiled graph,
not yet located; bench/README.md, "Batch invariance in bf16"), which is why ``dtype=auto``
stays fp32 on CPU. Skipped on CPUs with AMX, where the padding is not enough (below)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from loraplex.testing.launcher import RunningServer, loraplex_server, server_env

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        torch.cpu._is_amx_tile_supported(),
        reason="on AMX CPUs bf16 rows depend on the row count in ways the padding does not "
        "remove: vLLM multiplies weights of at most 1 MiB (o_proj) with sgl-kernel, and "
        "oneDNN changes kernels above 32 rows (bench/README.md, 'Batch invariance in bf16')",
    ),
]
BASE_NAME = "smollm2-135m"
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "def fibonacci(n):",
    "The three primary colours are",
    "In 1969, the first person to walk on the moon",
    "A recipe for bread starts with",
    "The mitochondria is",
    "Once upon a time, in a small village,",
]
MODELS = ["pirate", "shout", "random1", "random2", BASE_NAME]


@pytest.fixture(scope="module")
def bf16_server(
    tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path, adapters_dir: Path
) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("bf16-home")
    env = server_env(
        home,
        base_model_dir,
        adapters_dir=adapters_dir,
        served_model_name=BASE_NAME,
        dtype="bfloat16",
    )
    with loraplex_server(home / "server.log", env=env) as running:
        yield running


def body(model: str, prompt: str) -> dict:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": 32,
        "temperature": 0,
        "ignore_eos": True,
    }


def test_greedy_output_does_not_depend_on_the_batch(bf16_server: RunningServer) -> None:
    requests = [(MODELS[i % len(MODELS)], prompt) for i, prompt in enumerate(PROMPTS)]
    fillers = [
        (MODELS[i % len(MODELS)], f"Tell me about topic {i}, step by step.") for i in range(8)
    ]

    async def run(batch: list[tuple[str, str]], together: bool) -> list[str]:
        async with httpx.AsyncClient(base_url=bf16_server.url, timeout=300) as client:

            async def one(model: str, prompt: str) -> str:
                response = await client.post("/v1/completions", json=body(model, prompt))
                assert response.status_code == 200, response.text
                return response.json()["choices"][0]["text"]

            if together:
                return list(await asyncio.gather(*(one(m, p) for m, p in batch)))
            return [await one(m, p) for m, p in batch]

    alone = asyncio.run(run(requests, together=False))
    batched = asyncio.run(run(requests + fillers, together=True))[: len(requests)]
    changed = [requests[i] for i, (a, b) in enumerate(zip(alone, batched, strict=True)) if a != b]
    assert not changed, changed
    assert len(set(alone)) == len(alone)  # real, distinct completions
