"""Small valid adapters for the bundled model, shared by the unit tests (a module of its own:
``from conftest import`` finds whichever conftest pytest loaded first)."""

from __future__ import annotations

import functools
from pathlib import Path

from loraplex.basemodel import bundled_model_dir
from loraplex.config import Settings
from loraplex.registry.basedims import BaseDims
from loraplex.testing.random_adapters import write_random_adapter


@functools.cache
def served_dims() -> BaseDims:
    """The layer dims of the bundled base model the ``serve``d app prepares."""
    return BaseDims.from_model_dir(bundled_model_dir(Settings().models_dir))


def write_adapter_files(folder: Path, seed: int = 0) -> Path:
    """A valid rank-1 ``q_proj`` adapter for the bundled model (distinct per ``seed``)."""
    return write_random_adapter(
        folder, served_dims(), rank=1, alpha=2, targets=["q_proj"], seed=seed
    )
