"""What every layer shares about an adapter: names, references, PEFT files, resolved versions.

Names and references (``N``, ``N@vK``, ``N:alias``) are parsed and checked here and nowhere
else; a name matches ``NAME_RE`` (``^[a-z0-9][a-z0-9_-]{0,63}$``), so it can never become a
path. ``ResolvedAdapter`` is what a source hands the engine; ``AdapterSource`` is what the
server asks of wherever adapters are kept (see ``loraplex.adapter_sources``). This module
touches no storage and imports nothing heavy.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from loraplex.errors import InvalidAdapter, InvalidRequest, NotFound

if TYPE_CHECKING:
    from loraplex.registry.validate import BaseSpec

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
MANIFEST_FILE = "loraplex.json"
LINEAR_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The attention and MLP projections of a Llama-style decoder layer (all-linear LoRA)."""


@dataclass(frozen=True)
class ResolvedAdapter:
    """One immutable adapter version, ready to hand to the engine."""

    name: str
    version: str  # "N@vK": reported in x-loraplex-adapter, one LoRA id per value
    path: Path
    tenant: str | None = None
    fallback_to_base: bool = False
    prompt_format: str = "completion"  # how it was trained: "chat" or "completion"
    # Spent fetching its files from the blob store for this request (0: local); not identity.
    fetch_seconds: float = field(default=0.0, compare=False)
    # The ``BaseSpec`` these very files passed ``validate_adapter`` against, when the source
    # knows (None: unknown); the engine does not validate them again for an equal spec.
    checked_for: BaseSpec | None = field(default=None, compare=False)


def trained_format(manifest: object) -> str:
    """The prompt format a loraplex manifest records; adapters from elsewhere: completion."""
    chat = isinstance(manifest, dict) and manifest.get("prompt_format") == "chat"
    return "chat" if chat else "completion"


@dataclass(frozen=True)
class ModelCard:
    """What ``/v1/models`` says about one adapter name."""

    id: str
    owner: str | None  # the owning tenant; None: shared
    created: int  # Unix seconds: when the adapter was first pushed (or its files written)


MayUse = Callable[[str | None], bool]
"""Whether the caller may use an adapter owned by this tenant (None: shared)."""


def anyone(_owner: str | None) -> bool:
    """``MayUse`` of a caller who may use every adapter."""
    return True


def unknown_model(model: str) -> NotFound:
    """The one 404 for an adapter that does not exist or that the caller may not use."""
    return NotFound(f"The model '{model}' does not exist or this key may not use it.")


class AdapterSource(Protocol):
    """What the server needs from wherever adapters are kept."""

    def resolve(self, model: str, may_use: MayUse = anyone) -> ResolvedAdapter:
        """The version ``model`` names now; ``unknown_model`` for another tenant's adapter
        (checked before anything else about it); ``NotFound`` for anything unknown."""
        ...

    def resolve_held(self, model: str, may_use: MayUse = anyone) -> ResolvedAdapter | None:
        """``resolve`` where it needs no waiting (no query, no download: at most a few
        ``stat`` calls), so async code may call it directly; None where ``resolve`` must
        run (in a worker thread)."""
        ...

    def names(self, may_use: MayUse = anyone) -> list[str]:
        """Adapter names the caller can be served."""
        ...

    def models(self, may_use: MayUse = anyone) -> list[ModelCard]:
        """The same adapters with owner and creation time (for ``/v1/models``)."""
        ...

    def check(self) -> None:
        """Raise if the source cannot be read (for ``/ready``)."""
        ...


ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_VERSION_RE = re.compile(r"^v([1-9][0-9]{0,8})$")
DEFAULT_ALIAS = "stable"


@dataclass(frozen=True)
class AdapterRef:
    """A parsed reference: exactly one of ``number`` and ``alias`` is set."""

    name: str
    number: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.number is not None:
            return version_key(self.name, self.number)
        return f"{self.name}:{self.alias}"


def version_key(name: str, number: int) -> str:
    """The immutable key of one version, ``N@vK``."""
    return f"{name}@v{number}"


def check_name(name: str, what: str = "adapter") -> str:
    """Return ``name`` if it is a valid adapter (or ``what``: tenant) name, else raise
    ``InvalidAdapter`` (``InvalidRequest`` for anything but an adapter)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        error = InvalidAdapter if what == "adapter" else InvalidRequest
        raise error(
            f"Invalid {what} name {name!r}: use 1-64 characters from a-z, 0-9, '_' and '-', "
            "starting with a letter or digit (pattern ^[a-z0-9][a-z0-9_-]{0,63}$)."
        )
    return name


def check_alias(alias: str) -> str:
    """Return ``alias`` if it is a valid alias name, else raise ``InvalidRequest``."""
    if not isinstance(alias, str) or not ALIAS_RE.fullmatch(alias):
        raise InvalidRequest(
            f"Invalid alias {alias!r}: use 1-32 characters from a-z, 0-9, '_' and '-', "
            "starting with a letter (e.g. stable, canary)."
        )
    return alias


def parse_ref(text: str, *, default_alias: str | None = DEFAULT_ALIAS) -> AdapterRef:
    """Parse ``N``, ``N@vK`` or ``N:alias``.

    A bare ``N`` means ``N:<default_alias>``; with ``default_alias=None`` a bare name is refused
    (commands such as ``promote`` and ``delete`` need an exact version).
    Raises ``NotFound`` for anything malformed, because to a client an unparseable model name
    is simply a model that does not exist.
    """
    if not isinstance(text, str) or len(text) > 128:
        raise NotFound("The model name is not a valid adapter reference.")
    if "@" in text:
        name, _, version = text.partition("@")
        match = _VERSION_RE.fullmatch(version)
        if not NAME_RE.fullmatch(name) or not match:
            raise NotFound(f"'{text}' is not a valid adapter version; use NAME@vK, e.g. {name}@v1.")
        return AdapterRef(name, number=int(match.group(1)))
    if ":" in text:
        name, _, alias = text.partition(":")
        if not NAME_RE.fullmatch(name) or not ALIAS_RE.fullmatch(alias):
            raise NotFound(f"'{text}' is not a valid adapter alias; use NAME:ALIAS, e.g. x:stable.")
        return AdapterRef(name, alias=alias)
    if not NAME_RE.fullmatch(text):
        raise NotFound(f"'{text}' is not a valid adapter name.")
    if default_alias is None:
        raise InvalidRequest(f"'{text}' names no version; give NAME@vK, e.g. {text}@v1.")
    return AdapterRef(text, alias=default_alias)


def parse_version_key(text: str) -> AdapterRef:
    """Parse an exact ``N@vK`` (for promote/delete); anything else is ``InvalidRequest``."""
    ref = parse_ref(text, default_alias=None)
    if ref.number is None:
        raise InvalidRequest(f"'{text}' is an alias; give an exact version NAME@vK.")
    return ref
