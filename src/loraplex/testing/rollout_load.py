"""Continuous load across alias moves, and the check that every answer came from a version
the alias pointed at while the request was in flight (for tests and ``bench/hot_swap.py``).

``RolloutLoad`` runs ``workers`` threads that send small completions (every other one
streamed) for the given models in turn and record, per request, when it was sent and answered,
its status and ``x-loraplex-adapter``. ``AliasTimeline`` records each alias move as the window
in which it happened (the call's start and return). ``AliasTimeline.explain`` returns the
requests whose version was not the target at any moment in ``[sent - slack, answered]``
(``slack``: how stale a server may be allowed to be, the rollout bound).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from loraplex.registry.registry import Registry


@dataclass(frozen=True)
class Answer:
    """One request of the load."""

    model: str
    sent: float
    answered: float
    status: int
    version: str | None
    error: str = ""


@dataclass
class AliasTimeline:
    """Alias targets over time, per model (``time.monotonic`` clock)."""

    moves: dict[str, list[tuple[float, float, str]]] = field(default_factory=dict)

    def start(self, model: str, version: str) -> None:
        """``model`` points at ``version`` from now on (before the load starts)."""
        self.moves[model] = [(float("-inf"), float("-inf"), version)]

    def moved(self, model: str, began: float, returned: float, version: str) -> None:
        """A move of ``model`` to ``version`` happened somewhere in ``[began, returned]``."""
        self.moves[model].append((began, returned, version))

    def possible(self, model: str, version: str, start: float, end: float) -> bool:
        """Whether ``version`` may have been the target at some moment in ``[start, end]``."""
        moves = self.moves[model]
        for i, (began, _, target) in enumerate(moves):
            until = moves[i + 1][1] if i + 1 < len(moves) else float("inf")
            if target == version and began <= end and until >= start:
                return True
        return False

    def explain(self, answers: Sequence[Answer], slack: float) -> list[Answer]:
        """Successful answers whose version was never the target while they were in flight."""
        return [
            a
            for a in answers
            if a.status == 200
            and not self.possible(a.model, a.version or "", a.sent - slack, a.answered)
        ]


class RolloutLoad:
    """Background completions for ``models``; ``answers`` grows until ``stop``."""

    def __init__(
        self, url: str, models: Sequence[str], workers: int = 3, max_tokens: int = 4
    ) -> None:
        self.url = url
        self.models = list(models)
        self.max_tokens = max_tokens
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(workers)
        ]

    def __enter__(self) -> RolloutLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    @property
    def failures(self) -> list[Answer]:
        return [a for a in self.answers if a.status != 200]

    def _run(self, worker: int) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            sent = worker
            while not self._stop.is_set():
                model = self.models[sent % len(self.models)]
                self.answers.append(self._one(client, model, stream=bool(sent % 2)))
                sent += 1

    def _one(self, client: httpx.Client, model: str, stream: bool) -> Answer:
        body = {
            "model": model,
            "prompt": "The weather today is",
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": stream,
        }
        sent = time.monotonic()
        try:
            with client.stream("POST", "/v1/completions", json=body) as response:
                text = response.read().decode()
                ok = response.status_code == 200 and (not stream or "[DONE]" in text)
                status = 599 if response.status_code == 200 and not ok else response.status_code
                return Answer(
                    model,
                    sent,
                    time.monotonic(),
                    status,
                    response.headers.get("x-loraplex-adapter"),
                    "" if ok else text[:300],
                )
        except httpx.HTTPError as exc:
            return Answer(model, sent, time.monotonic(), 599, None, repr(exc))


def move_alias(
    registry: Registry, timeline: AliasTimeline, name: str, move: int
) -> tuple[float, str]:
    """Move ``name``'s stable alias: promote ``name@v2`` on moves 0-2 of every 6, roll back
    on 3-5; record the move in ``timeline``. Returns when the call returned, and the target."""
    began = time.monotonic()
    if move % 6 < 3:
        registry.promote(f"{name}@v2")
    else:
        registry.rollback(name)
    returned = time.monotonic()
    target = registry.resolve(name).key
    timeline.moved(name, began, returned, target)
    return returned, target
