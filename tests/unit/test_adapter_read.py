"""``engine.adapter_read``: vLLM's adapter read, patched, builds what the stock read builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors
import torch
from adapter_files import served_dims
from safetensors import SafetensorError
from vllm.lora import lora_model, utils
from vllm.lora.lora_model import LoRAModel
from vllm.lora.peft_helper import PEFTHelper

from loraplex.engine.adapter_read import read_adapters_whole
from loraplex.testing.random_adapters import LINEAR_PROJECTIONS, write_random_adapter

EXPECTED = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def read(folder: Path, dtype: torch.dtype, expected: set[str] = EXPECTED) -> LoRAModel:
    """The adapter in ``folder`` read as vLLM's CPU worker reads it."""
    helper = PEFTHelper.from_local_dir(str(folder), 8192)
    return LoRAModel.from_local_checkpoint(
        str(folder), expected, peft_helper=helper, lora_model_id=1, device="cpu", dtype=dtype
    )


@pytest.fixture
def stock_then_patched(monkeypatch: pytest.MonkeyPatch):
    """Starts with vLLM's own read (whatever ran before); ``patch()`` switches to ours. The
    module is restored after the test."""
    monkeypatch.setattr(lora_model, "safetensors", safetensors)
    monkeypatch.setattr(lora_model, "parse_fine_tuned_lora_name", utils.parse_fine_tuned_lora_name)
    return read_adapters_whole


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_read_builds_the_same_model(tmp_path: Path, stock_then_patched, dtype) -> None:
    folder = write_random_adapter(tmp_path / "a", served_dims(), rank=4, targets=LINEAR_PROJECTIONS)
    stock = read(folder, dtype)
    stock_then_patched()
    ours = read(folder, dtype)
    assert lora_model.safetensors is not safetensors  # the patch is in place
    assert list(ours.loras) == list(stock.loras)
    assert len(ours.loras) == 30 * len(LINEAR_PROJECTIONS)
    for name, weights in stock.loras.items():
        got = ours.loras[name]
        assert (got.rank, got.lora_alpha, got.scaling) == (
            weights.rank, weights.lora_alpha, weights.scaling
        )  # fmt: skip
        for theirs, mine in ((weights.lora_a, got.lora_a), (weights.lora_b, got.lora_b)):
            assert mine.dtype == dtype and mine.shape == theirs.shape
            assert torch.equal(mine, theirs)


def test_unexpected_modules_are_refused_as_before(tmp_path: Path, stock_then_patched) -> None:
    folder = write_random_adapter(tmp_path / "a", served_dims(), targets=["q_proj", "o_proj"])
    with pytest.raises(ValueError, match="o_proj") as stock:
        read(folder, torch.float32, {"q_proj", "v_proj"})
    stock_then_patched()
    with pytest.raises(ValueError, match="o_proj") as ours:
        read(folder, torch.float32, {"q_proj", "v_proj"})
    assert str(ours.value) == str(stock.value)


def test_a_damaged_file_fails_as_before(tmp_path: Path, stock_then_patched) -> None:
    folder = write_random_adapter(tmp_path / "a", served_dims(), targets=["q_proj"])
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(SafetensorError):
        read(folder, torch.float32)
    stock_then_patched()
    with pytest.raises(SafetensorError):
        read(folder, torch.float32)


def test_patching_twice_wraps_once(stock_then_patched) -> None:
    stock_then_patched()
    parse = lora_model.parse_fine_tuned_lora_name
    stock_then_patched()
    assert lora_model.parse_fine_tuned_lora_name is parse
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    parsed = ("model.layers.0.self_attn.q_proj", True)
    assert parse(name) == utils.parse_fine_tuned_lora_name(name) == parsed


def test_names_are_parsed_as_before_with_or_without_renames(stock_then_patched) -> None:
    from vllm.model_executor.models.utils import WeightsMapper

    stock_then_patched()
    parse = lora_model.parse_fine_tuned_lora_name
    name = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
    renames = WeightsMapper(orig_to_new_prefix={"model.": "language_model.model."})
    for mapper in (None, WeightsMapper(), renames, None):
        assert parse(name, mapper) == utils.parse_fine_tuned_lora_name(name, mapper)
    assert parse(name, renames)[0] == "language_model.model.layers.0.mlp.down_proj"
