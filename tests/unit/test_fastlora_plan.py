"""How LoraPlan splits a step's tokens between direct segments and the packed group."""

from __future__ import annotations

import pytest
import torch

from loraplex.config import SettingsError
from loraplex.fastlora.plan import LONG_SEGMENT, LoraPlan
from loraplex.fastlora.plugin import fast_lora_enabled, platform_plugin


def test_empty_and_all_base():
    assert LoraPlan.build(torch.empty(0, dtype=torch.long)).empty
    plan = LoraPlan.build(torch.full((9,), -1))
    assert plan.empty
    assert not plan.covers_all


def test_one_adapter_is_one_direct_segment():
    plan = LoraPlan.build(torch.full((5,), 3))
    assert plan.direct == [(3, 0, 5)]
    assert plan.packed is None
    assert plan.covers_all


def test_long_runs_direct_and_short_runs_packed_contiguously():
    n = LONG_SEGMENT
    indices = torch.tensor([1] * n + [-1] * 2 + [0, 2, -1, 0] + [2] * n)
    plan = LoraPlan.build(indices)
    assert plan.direct == [(1, 0, n), (2, n + 6, 2 * n + 6)]
    packed = plan.packed
    assert packed is not None
    assert packed.rows == slice(n + 2, n + 6)
    assert (packed.lo, packed.span) == (0, 3)
    assert packed.onehot.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0], [1, 0, 0]]


def test_short_runs_around_a_long_run_use_an_index():
    n = LONG_SEGMENT
    indices = torch.tensor([0, 1] + [2] * n + [1, 0])
    plan = LoraPlan.build(indices)
    assert plan.direct == [(2, 2, n + 2)]
    assert plan.packed is not None
    assert plan.packed.rows.tolist() == [0, 1, n + 2, n + 3]
    assert plan.covers_all


def test_mask_is_scaled_and_widened_per_rank():
    plan = LoraPlan.build(torch.tensor([0, -1, 1]))
    assert plan.packed is not None
    mask = plan.packed.mask(2, torch.float32, 0.5)
    assert mask.tolist() == [[0.5, 0.5, 0, 0], [0, 0, 0, 0], [0, 0, 0.5, 0.5]]
    assert plan.packed.mask(2, torch.float32, 0.5) is mask


@pytest.mark.parametrize(("value", "enabled"), [(None, True), ("on", True), ("off", False)])
def test_switch(value, enabled, monkeypatch):
    monkeypatch.delenv("LORAPLEX_FAST_LORA", raising=False)
    if value is not None:
        monkeypatch.setenv("LORAPLEX_FAST_LORA", value)
    assert fast_lora_enabled() is enabled


@pytest.mark.parametrize("value", ["fast", "OFF", "1"])
def test_switch_rejects_values_outside_on_off(value, monkeypatch):
    monkeypatch.setenv("LORAPLEX_FAST_LORA", value)
    with pytest.raises(SettingsError, match="LORAPLEX_FAST_LORA"):
        fast_lora_enabled()
    assert platform_plugin() is None
