"""Where the server finds adapters: the ``AdapterSource`` protocol and the folder source.

A source turns the ``model`` a client sent (``N``, ``N@vK``, ``N:alias``) into a
``ResolvedAdapter``: an immutable version key and a local folder holding
``adapter_config.json`` + ``adapter_model.safetensors``. The engine gives one LoRA id per
version key, so a key must never name other weights. The registry source lives in
``loraplex.registry``; this module holds the protocol and the plain-folder source.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from loraplex.errors import NotFound

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


@dataclass(frozen=True)
class ResolvedAdapter:
    """One immutable adapter version, ready to hand to the engine."""

    name: str
    version: str  # "N@vK": reported in x-loraplex-adapter, one LoRA id per value
    path: Path
    tenant: str | None = None
    fallback_to_base: bool = False


class AdapterSource(Protocol):
    """What the server needs from wherever adapters are kept."""

    def resolve(self, model: str) -> ResolvedAdapter:
        """The version ``model`` names now; raises ``NotFound`` for anything unknown."""
        ...

    def names(self) -> list[str]:
        """Adapter names that can be served (for ``/v1/models``)."""
        ...

    def check(self) -> None:
        """Raise if the source cannot be read (for ``/ready``)."""
        ...


class FolderAdapterSource:
    """Adapters as sub-folders of one local folder, named by the folder.

    The version is ``N@sha-<first 12 hex of the weights' sha256>`` so that replacing a
    folder's weights gives a new version (and a new LoRA id) instead of reusing the old one.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._hashes: dict[tuple[str, int, int], str] = {}

    def resolve(self, model: str) -> ResolvedAdapter:
        name = model.split("@", 1)[0].split(":", 1)[0]
        if not NAME_PATTERN.fullmatch(name):
            raise NotFound(f"The model '{model}' does not exist.")
        folder = self.root / name
        weights = folder / WEIGHTS_FILE
        if not weights.is_file() or not (folder / CONFIG_FILE).is_file():
            raise NotFound(f"The model '{model}' does not exist.")
        version = f"{name}@sha-{self._weights_hash(weights)[:12]}"
        if model not in (name, version):
            raise NotFound(f"The model '{model}' does not exist; '{name}' is {version}.")
        return ResolvedAdapter(name=name, version=version, path=folder)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if NAME_PATTERN.fullmatch(p.name) and (p / WEIGHTS_FILE).is_file()
        )

    def check(self) -> None:
        if not self.root.is_dir():
            raise NotFound(f"Adapters folder {self.root} does not exist.")
        next(self.root.iterdir(), None)

    def _weights_hash(self, weights: Path) -> str:
        stat = weights.stat()
        key = (str(weights), stat.st_mtime_ns, stat.st_size)
        if key not in self._hashes:
            self._hashes[key] = hashlib.sha256(weights.read_bytes()).hexdigest()
        return self._hashes[key]
