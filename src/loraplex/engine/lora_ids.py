"""One LoRA integer id per adapter version, for the life of the process.

vLLM caches adapter weights by integer id, so an id that ever named other weights would
serve the wrong adapter (one fixed id for every adapter serves whichever vLLM loaded first).
Ids only grow; a version key keeps its id even after it is unloaded, and no key ever gets an
id another key had.
"""

from __future__ import annotations

import threading


class LoraIdAllocator:
    """Maps version keys (``N@vK``) to unique, never-reused positive integers."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._lock = threading.Lock()

    def id_for(self, version: str) -> int:
        """The id of ``version``, allocating the next one on first sight."""
        with self._lock:
            if version not in self._ids:
                self._ids[version] = len(self._ids) + 1
            return self._ids[version]

    def known(self, version: str) -> int | None:
        """The id of ``version`` if it has one, without allocating."""
        with self._lock:
            return self._ids.get(version)

    def version_of(self, lora_id: int) -> str | None:
        """The version key ``lora_id`` was given to, if any."""
        with self._lock:
            return next((v for v, i in self._ids.items() if i == lora_id), None)
