"""AdapterFit: the engine's check of a version, remembered until its files change."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from adapter_files import write_adapter_files
from safetensors.numpy import load_file, save_file

from loraplex.adapters import WEIGHTS_FILE, ResolvedAdapter
from loraplex.config import Settings
from loraplex.engine.adapter_fit import AdapterFit
from loraplex.errors import InvalidAdapter
from loraplex.registry.tensorfile import nonfinite_tensors, read_header


@pytest.fixture
def fit(model_dir: Path) -> AdapterFit:
    return AdapterFit(Settings(), model_dir, "float32")


def test_a_version_that_passed_is_not_read_again(
    fit: AdapterFit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = ResolvedAdapter("sales", "v1", write_adapter_files(tmp_path / "sales"))
    weighed = fit.check(adapter)
    assert weighed > 0

    def must_not_run(*args: object) -> None:
        raise AssertionError("validated again although no file changed")

    monkeypatch.setattr("loraplex.engine.adapter_fit.validate_adapter", must_not_run)
    assert fit.check(adapter) == weighed


def test_a_changed_file_is_checked_again(fit: AdapterFit, tmp_path: Path) -> None:
    folder = write_adapter_files(tmp_path / "sales")
    adapter = ResolvedAdapter("sales", "v1", folder)
    fit.check(adapter)
    weights = folder / WEIGHTS_FILE
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = np.full_like(tensors[name], np.nan)
    save_file(tensors, weights)
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    with pytest.raises(InvalidAdapter, match="NaN|Inf|finite"):
        fit.check(adapter)


def test_nonfinite_values_are_found_in_every_tensor(tmp_path: Path) -> None:
    folder = write_adapter_files(tmp_path / "sales")
    weights = folder / WEIGHTS_FILE
    tensors = load_file(weights)
    last = sorted(tensors)[-1]
    tensors[last] = tensors[last].copy()
    tensors[last].flat[-1] = np.inf
    save_file(tensors, weights)
    header = read_header(weights)
    assert nonfinite_tensors(header) == [last]


def test_files_its_source_checked_for_this_base_are_not_validated_again(
    fit: AdapterFit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(
        "loraplex.engine.adapter_fit.validate_adapter", lambda path, *_: calls.append(path)
    )
    checked = ResolvedAdapter(
        "sales", "v1", write_adapter_files(tmp_path / "a"), checked_for=fit.spec
    )
    assert fit.check(checked) > 0  # still weighed
    assert calls == []
    other = replace(fit.spec, max_rank=fit.spec.max_rank + 1)  # checked under other limits
    folder = write_adapter_files(tmp_path / "b")
    fit.check(ResolvedAdapter("sales", "v2", folder, checked_for=other))
    assert calls == [folder]
