"""Which adapter versions the engine holds: an LRU bounded in count and in bytes, with pins.

Pure bookkeeping for ``VllmEngine``, which does the engine calls and holds the lock that
serialises them. Each entry records the adapter's bytes in the engine, whether it is pinned,
how many streams use it now, and whether it is leaving (unload asked, or chosen for eviction):
a leaving entry is not served to new requests and is removed from the engine once its last
stream ends, so that a stream always finishes on the weights it started with.
This module never talks to vLLM and never waits.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from loraplex.errors import Conflict, TooLarge, Unavailable

MIB = 2**20


@dataclass
class Entry:
    """One version the engine holds."""

    nbytes: int
    pinned: bool = False
    in_flight: int = 0
    leaving: bool = False


class Residency:
    """Versions in the engine, least recently used first."""

    def __init__(self, max_count: int, max_bytes: int, max_pinned: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.max_pinned = max_pinned
        self._entries: OrderedDict[str, Entry] = OrderedDict()

    def serving(self, version: str) -> bool:
        """Whether new requests may use ``version`` as it is (resident and not leaving)."""
        entry = self._entries.get(version)
        return entry is not None and not entry.leaving

    def get(self, version: str) -> Entry | None:
        return self._entries.get(version)

    @property
    def used_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def touch(self, version: str) -> None:
        """Mark ``version`` most recently used."""
        self._entries.move_to_end(version)

    def victims(self, version: str, nbytes: int) -> list[str]:
        """Versions to remove, least recently used first, so that ``version`` fits.

        Raises ``TooLarge`` if it cannot fit even alone, ``Unavailable`` (retry later) if pinned
        and in-use versions leave no room.
        """
        if nbytes > self.max_bytes:
            raise TooLarge(
                f"Adapter {version} needs {nbytes / MIB:.1f} MiB in the engine, more than the "
                f"whole adapter cache ({self.max_bytes / MIB:.1f} MiB, LORAPLEX_ADAPTER_CACHE_MB)."
            )
        count, used = len(self._entries) + 1, self.used_bytes + nbytes
        chosen = []
        for name, entry in self._entries.items():
            if count <= self.max_count and used <= self.max_bytes:
                break
            if entry.pinned or entry.in_flight or entry.leaving:
                continue
            chosen.append(name)
            count -= 1
            used -= entry.nbytes
        if count > self.max_count or used > self.max_bytes:
            raise Unavailable(
                f"The adapter cache is full: loading {version} ({nbytes / MIB:.1f} MiB) needs "
                f"{used / MIB:.1f} MiB of {self.max_bytes / MIB:.1f} MiB and {count} of "
                f"{self.max_count} adapters even after evicting every idle one; the rest are "
                "pinned or serving requests. Retry shortly.",
                retry_after=2,
            )
        return chosen

    def add(self, version: str, nbytes: int) -> None:
        self._entries[version] = Entry(nbytes)

    def remove(self, version: str) -> None:
        self._entries.pop(version, None)

    def keep(self, version: str) -> None:
        """Cancel a pending unload: ``version`` serves again."""
        self._entries[version].leaving = False
        self.touch(version)

    def leave(self, version: str) -> int:
        """Stop serving ``version`` to new requests; returns its streams still in flight."""
        entry = self._entries[version]
        entry.leaving = True
        entry.pinned = False
        return entry.in_flight

    def check_pin(self, version: str) -> None:
        """Raise ``Conflict`` if pinning ``version`` would exceed the pin bound."""
        pinned = [name for name, entry in self._entries.items() if entry.pinned]
        if version not in pinned and len(pinned) >= self.max_pinned:
            raise Conflict(
                f"{len(pinned)} adapters are pinned ({', '.join(pinned) or 'none allowed'}), the "
                f"most LORAPLEX_MAX_PINNED_ADAPTERS={self.max_pinned} allows; unload one first."
            )

    def pin(self, version: str) -> None:
        self._entries[version].pinned = True

    def acquire(self, version: str) -> bool:
        """Count a stream on ``version``; False if it is not serving (load it again)."""
        if not self.serving(version):
            return False
        self._entries[version].in_flight += 1
        self.touch(version)
        return True

    def release(self, version: str) -> bool:
        """End a stream on ``version``; True if it is leaving and now unused (remove it)."""
        entry = self._entries.get(version)
        if entry is None:
            return False
        entry.in_flight -= 1
        return entry.leaving and entry.in_flight == 0

    def snapshot(self) -> dict[str, str]:
        """Version -> "pinned", "cpu" or "unloading" (leaving, streams still running)."""
        return {
            name: "unloading" if e.leaving else "pinned" if e.pinned else "cpu"
            for name, e in self._entries.items()
        }
