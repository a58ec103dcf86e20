"""A bystander load for fault tests: one tenant's good requests, sequential, on a thread.

Every hardening test runs one beside the fault it injects and asserts afterwards that the
bystander saw no error (``bystander.assert_clean()``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import httpx


class Bystander:
    """Sequential small completions for ``models`` in turn; keeps every failure."""

    def __init__(
        self,
        url: str,
        models: Sequence[str],
        key: str | None = None,
        max_tokens: int = 4,
        timeout: float = 120,
    ) -> None:
        self.url = url
        self.models = list(models)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.max_tokens = max_tokens
        self.timeout = timeout
        self.sent = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout, headers=self.headers) as client:
            while not self._stop.is_set():
                model = self.models[self.sent % len(self.models)]
                body = {
                    "model": model,
                    "prompt": "The sea is",
                    "max_tokens": self.max_tokens,
                    "temperature": 0,
                }
                self.sent += 1
                try:
                    response = client.post(self.url + "/v1/completions", json=body)
                except httpx.HTTPError as exc:
                    self.failures.append(f"{model}: {type(exc).__name__} {exc}")
                    continue
                if response.status_code != 200:
                    self.failures.append(f"{model}: {response.status_code} {response.text[:200]}")

    def __enter__(self) -> Bystander:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def stopped(self) -> bool:
        """Whether its thread has ended (after ``stop`` or ``last_request``)."""
        return not self._thread.is_alive()

    def last_request(self) -> None:
        """Send nothing after the request in flight (``stop`` still waits for it)."""
        self._stop.set()

    def stop(self) -> None:
        """Stop after the request in flight."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout + 60)

    def wait_sent(self, count: int, within: float = 300) -> None:
        """Return once it has sent ``count`` requests in all; fail after ``within`` seconds
        (a generous bound: it is slow only beside a slow fault) or if it has stopped."""
        deadline = time.monotonic() + within
        while self.sent < count:
            assert self._thread.is_alive(), f"the bystander stopped after {self.sent} requests"
            assert time.monotonic() < deadline, f"the bystander sent only {self.sent} requests"
            time.sleep(0.1)

    def assert_clean(self, min_sent: int = 3) -> None:
        """It sent at least ``min_sent`` requests and every one succeeded."""
        assert self.sent >= min_sent, f"the bystander sent only {self.sent} requests"
        assert self.failures == [], f"the bystander saw errors: {self.failures[:5]}"
