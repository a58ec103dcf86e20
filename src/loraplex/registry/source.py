"""``RegistryAdapterSource``: the server's view of the registry (``AdapterSource`` protocol).

Each ``resolve`` looks the alias up in the catalog again, so a promote or rollback is seen
by every server at once, with no restart; the version's files come from the local LRU cache,
fetched and sha256-verified on first use. A version recorded against another base model is
refused (409) before it reaches the engine, and so is one whose rank exceeds this server's
maximum (the registry may have been filled by a machine with a higher limit). ``resolve``
does blocking I/O (database, maybe a download): call it from a worker thread in async code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loraplex.errors import IncompatibleAdapter
from loraplex.server.adapters import ResolvedAdapter

if TYPE_CHECKING:
    from loraplex.basemodel import BaseModelInfo
    from loraplex.config import Settings
    from loraplex.registry.registry import Registry


class RegistryAdapterSource:
    """Adapters served from the registry, by ``N``, ``N:alias`` or ``N@vK``."""

    def __init__(
        self, registry: Registry, base_fingerprint: str | None = None, max_rank: int | None = None
    ) -> None:
        self.registry = registry
        self.base_fingerprint = base_fingerprint
        self.max_rank = max_rank

    def resolve(self, model: str) -> ResolvedAdapter:
        """The version ``model`` names now, with a local folder holding its files."""
        version = self.registry.resolve(model)
        if self.base_fingerprint and version.base_fingerprint != self.base_fingerprint:
            raise IncompatibleAdapter(
                f"{version.key} was validated against base model "
                f"{version.base_fingerprint[:12]}, this server runs {self.base_fingerprint[:12]}; "
                "push the adapter to a registry for this base."
            )
        if self.max_rank is not None and version.rank > self.max_rank:
            raise IncompatibleAdapter(
                f"{version.key} has LoRA rank {version.rank}, above this server's maximum "
                f"{self.max_rank} (LORAPLEX_MAX_LORA_RANK)."
            )
        return ResolvedAdapter(
            name=version.name,
            version=version.key,
            path=self.registry.local_folder(version),
            tenant=version.tenant,
            fallback_to_base=version.fallback_to_base,
        )

    def names(self) -> list[str]:
        """Names with a ``stable`` alias (what a bare ``N`` serves)."""
        return self.registry.catalog.names()

    def check(self) -> None:
        """Raise ``Unavailable`` unless the catalog and blob store answer."""
        self.registry.check()


def registry_source(settings: Settings, base: BaseModelInfo) -> RegistryAdapterSource:
    """Source factory for the server app: the configured registry, checked against ``base``."""
    from loraplex.registry.factory import open_registry

    return RegistryAdapterSource(open_registry(settings), base.fingerprint, settings.max_lora_rank)
