"""What the engine checks before it loads an adapter version, and what the version weighs.

vLLM reads an adapter's tensors at ``add_lora`` but copies them into its LoRA slots only in
a forward step, so a tensor of the wrong shape would fail that step: every request in the
batch, and the engine with it. The engine therefore runs the registry's own validation
(files, config, rank, every tensor's shape against the base's layers, finite values) on
each version before vLLM sees it, unless the source that resolved it already validated
those very files against the same ``BaseSpec`` (``ResolvedAdapter.checked_for``: the folder
source's snapshot, a registry version pushed for this base within this server's limits),
and weighs the version in engine bytes (elements times the engine dtype's size) for the
adapter cache's byte budget.
A version that passed is remembered by its files' identity (inode, size, mtime), so loading
it again after an eviction does not read every tensor again.
"""

from __future__ import annotations

from pathlib import Path

from loraplex.adapters import CONFIG_FILE, WEIGHTS_FILE, ResolvedAdapter
from loraplex.basemodel import describe
from loraplex.config import Settings
from loraplex.registry.basedims import BaseDims
from loraplex.registry.tensorfile import element_count
from loraplex.registry.validate import BaseSpec, validate_adapter

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


class AdapterFit:
    """Validation against the served base model, and engine bytes, of adapter versions."""

    def __init__(self, settings: Settings, model_dir: Path, dtype: str) -> None:
        info = describe(model_dir)
        self.itemsize = ITEMSIZE[dtype]
        self.spec = BaseSpec(
            fingerprint=info.fingerprint,
            dims=BaseDims.from_model_dir(info.path),
            name=info.name,
            max_rank=settings.max_lora_rank,
            max_bytes=settings.max_adapter_mb * 2**20,
        )
        self._passed: dict[tuple[object, ...], int] = {}

    def check(self, adapter: ResolvedAdapter) -> int:
        """Raise the registry's error if ``adapter`` cannot serve; else its engine bytes."""
        identity = _identity(adapter.path)
        passed = self._passed.get(identity)
        if passed is not None:
            return passed
        if adapter.checked_for != self.spec:  # else its source validated these files
            validate_adapter(adapter.path, adapter.name, self.spec)
        nbytes = element_count(adapter.path / WEIGHTS_FILE) * self.itemsize
        self._passed[identity] = nbytes
        return nbytes


def _identity(folder: Path) -> tuple[object, ...]:
    """What changes when any file the engine reads changes: path, inode, size, mtime."""
    parts: list[object] = [folder.resolve()]
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            stat = (folder / name).stat()
        except OSError:
            return (folder, None)  # validation will name what is missing; not remembered
        parts += [stat.st_ino, stat.st_size, stat.st_mtime_ns]
    return tuple(parts)
