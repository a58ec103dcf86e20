"""What each benchmark request asks for: model (Zipf over adapters), tenant, prompt.

Adapter ranks follow Zipf(s): the i-th adapter (1-based) is picked with probability
proportional to ``1 / i**s`` (``s = 0`` is uniform). Adapter i belongs to tenant ``i mod T``
unless owners are given (from each tenant key's ``/v1/models``); with no adapters every
request goes to the base model from a random tenant.
Prompts come from a file (text: one per line; JSONL: ``{"prompt": ...}`` or
``{"messages": [...]}``) or a small built-in set. Pure logic, seeded; no I/O but reading
the prompts file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loraplex.errors import InvalidRequest

BUILTIN_PROMPTS = [
    "Explain the return policy for electronics in two sentences.",
    "Write a short summary of a quarterly financial report.",
    "What are the main differences between a list and a tuple in Python?",
    "Give three tips for writing a clear bug report.",
    "Describe how a hash table works.",
    "Write a polite email declining a meeting invitation.",
    "What is the capital of France, and what is it famous for?",
    "List four healthy breakfast ideas.",
    "Explain what a LoRA adapter is to a new engineer.",
    "Summarise the plot of a detective story in three sentences.",
    "How do I reset a forgotten password on a typical website?",
    "Translate 'good morning, how are you?' into Spanish and French.",
    "What should a customer do if a package arrives damaged?",
    "Write a haiku about autumn rain.",
    "Explain the difference between latency and throughput.",
    "Give a one-paragraph introduction to photosynthesis.",
]


@dataclass(frozen=True)
class PlannedRequest:
    """One request to send: which model, for which tenant, with which prompt."""

    index: int
    model: str
    tenant: str
    payload: Any
    """A prompt string (completions) or a list of chat messages (chat)."""


def zipf_weights(n: int, s: float) -> np.ndarray:
    """Probabilities of ranks 1..n under Zipf(s)."""
    if n < 1:
        raise InvalidRequest("Zipf needs at least one adapter.")
    if s < 0:
        raise InvalidRequest(f"The Zipf exponent must be >= 0, got {s}.")
    weights = 1.0 / np.arange(1, n + 1, dtype=float) ** s
    return weights / weights.sum()


def load_prompts(path: Path | None, kind: str) -> list[Any]:
    """Prompts for ``kind`` ("completion" or "chat") from ``path`` or the built-in set."""
    if path is None:
        texts: list[Any] = list(BUILTIN_PROMPTS)
    else:
        if not path.is_file():
            raise InvalidRequest(f"Prompts file {path} does not exist.")
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            if path.suffix == ".jsonl":
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InvalidRequest(f"{path}:{number} is not JSON: {exc}") from exc
                if isinstance(item, dict) and isinstance(item.get("messages"), list):
                    texts.append(item["messages"])
                elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
                    texts.append(item["prompt"])
                else:
                    raise InvalidRequest(f"{path}:{number} needs a 'prompt' or 'messages' key.")
            else:
                texts.append(line)
        if not texts:
            raise InvalidRequest(f"Prompts file {path} holds no prompts.")
    return [_as_kind(t, kind) for t in texts]


def _as_kind(item: Any, kind: str) -> Any:
    if kind == "chat":
        return item if isinstance(item, list) else [{"role": "user", "content": item}]
    if isinstance(item, list):
        return "\n".join(str(m.get("content", "")) for m in item if isinstance(m, dict))
    return item


class Workload:
    """An endless, seeded sequence of ``PlannedRequest``s."""

    def __init__(
        self,
        *,
        adapters: list[str],
        base_model: str | None,
        zipf_s: float,
        tenants: int,
        prompts: list[Any],
        seed: int = 0,
        owners: list[int] | None = None,
    ) -> None:
        if tenants < 1:
            raise InvalidRequest("--tenants must be at least 1.")
        if not adapters and not base_model:
            raise InvalidRequest("No adapters and no base model to send requests to.")
        if not prompts:
            raise InvalidRequest("No prompts to send.")
        self.adapters, self.base_model, self.tenants = adapters, base_model, tenants
        self.prompts = prompts
        if owners is not None and (
            len(owners) != len(adapters) or max(owners, default=0) >= tenants
        ):
            raise InvalidRequest("Each adapter needs an owner among the tenants.")
        self.owners = owners
        self.weights = zipf_weights(len(adapters), zipf_s) if adapters else None
        self.rng = np.random.default_rng(seed)

    def tenant_of(self, adapter_rank: int) -> str:
        """The tenant owning the adapter at 0-based ``adapter_rank``."""
        if self.owners is not None:
            return f"tenant-{self.owners[adapter_rank]}"
        return f"tenant-{adapter_rank % self.tenants}"

    def next(self, index: int) -> PlannedRequest:
        """The request with this index (call in order: the sequence is seeded)."""
        prompt = self.prompts[int(self.rng.integers(len(self.prompts)))]
        if self.weights is None:
            tenant = f"tenant-{int(self.rng.integers(self.tenants))}"
            return PlannedRequest(index, str(self.base_model), tenant, prompt)
        rank = int(self.rng.choice(len(self.adapters), p=self.weights))
        return PlannedRequest(index, self.adapters[rank], self.tenant_of(rank), prompt)

    def __iter__(self) -> Iterator[PlannedRequest]:
        index = 0
        while True:
            yield self.next(index)
            index += 1


def poisson_gaps(rate: float, seed: int = 0) -> Iterator[float]:
    """Seconds between arrivals of a Poisson process with ``rate`` requests per second."""
    if rate <= 0:
        raise InvalidRequest(f"--rate must be > 0, got {rate}.")
    rng = np.random.default_rng(seed + 1)
    while True:
        yield float(rng.exponential(1.0 / rate))
