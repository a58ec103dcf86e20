"""The startup memory check: settings whose plan exceeds the budget are refused with the
arithmetic, on the real bundled model's config and weights headers."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.config import SettingsError, load_settings
from loraplex.engine.memory import GIB, check_memory, planned_bytes


def test_the_plan_adds_weights_kv_slots_and_adapter_cache(model_dir: Path) -> None:
    settings = load_settings(base_model=model_dir, kv_cache_gib=2, adapter_cache_mb=512)
    parts = dict(
        (what.split(" (")[0], n) for n, what in planned_bytes(settings, model_dir, "float32", True)
    )
    assert parts["adapter cache"] == 512 * 2**20
    assert parts["KV cache"] == 2 * GIB
    assert 134e6 * 4 < parts["base weights"] < 136e6 * 4 + 200e6  # ~135M parameters in fp32
    assert parts["LoRA slots"] > 0
    on_gpu = planned_bytes(settings, model_dir, "bfloat16", False)
    assert [what for _, what in on_gpu] == ["adapter cache (--adapter-cache-mb 512)"]


def test_settings_over_the_budget_are_refused_with_the_arithmetic(model_dir: Path) -> None:
    settings = load_settings(base_model=model_dir, kv_cache_gib=4, memory_budget_gib=3)
    with pytest.raises(SettingsError) as raised:
        check_memory(settings, "float32", on_cpu=True)
    message = raised.value.message
    assert "4.00 GiB KV cache (--kv-cache-gib 4)" in message
    assert "1.00 GiB adapter cache (--adapter-cache-mb 1024)" in message
    assert "more than the memory budget 3.00 GiB (--memory-budget-gib)" in message
    check_memory(settings.model_copy(update={"memory_budget_gib": 8.0}), "float32", on_cpu=True)


def test_pins_must_leave_an_engine_slot() -> None:
    with pytest.raises(SettingsError, match=r"max_pinned_adapters \(8\) must be < max_loras \(8\)"):
        load_settings(max_pinned_adapters=8)
