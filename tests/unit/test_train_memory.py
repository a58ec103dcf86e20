"""Unit tests of the batch-size / checkpointing planner and of option checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.adapters import LINEAR_PROJECTIONS
from loraplex.errors import InvalidRequest
from loraplex.train import memory
from loraplex.train.options import TrainOptions

GIB = memory.GIB
LLAMA_8B = memory.Shape(4096, 14336, 32, 128256, 8, 128)
SMOL = memory.Shape(576, 1536, 30, 49152, 3, 64)
WEIGHTS_8B = 8_030_000_000 * 2


def plan(shape: memory.Shape, available: float, seq: int = 2048, **kw: object) -> memory.Plan:
    weights = WEIGHTS_8B if shape is LLAMA_8B else 135_000_000 * 2
    return memory.choose(
        shape, fixed_bytes=weights, seq_len=seq, available_bytes=int(available * GIB),
        element_bytes=2, max_batch=64, max_tokens=65536, **kw,
    )  # fmt: skip


def test_8b_on_h200_runs_without_checkpointing() -> None:
    chosen = plan(LLAMA_8B, 139)
    assert (chosen.batch_size, chosen.gradient_checkpointing) == (2, False)
    # the reference peak was 62 GiB; the estimate is on the safe side, not wildly so
    assert 62 * GIB <= chosen.estimated_bytes <= 75 * GIB


def test_8b_on_small_gpu_falls_back_to_checkpointing() -> None:
    chosen = plan(LLAMA_8B, 40)
    assert chosen.gradient_checkpointing is True and chosen.batch_size >= 1
    assert chosen.estimated_bytes <= 40 * GIB * memory.HEADROOM


def test_8b_checkpointed_estimate_near_reference() -> None:
    use = memory.estimate(LLAMA_8B, WEIGHTS_8B, 2048, 2, 2, ckpt=True)
    assert 22 * GIB <= use <= 28 * GIB


def test_small_model_gets_a_large_batch() -> None:
    chosen = plan(SMOL, 139, seq=1024)
    assert chosen.gradient_checkpointing is False
    assert chosen.batch_size == 32  # 64 would not fit in 85% of 139 GiB


def test_overrides_are_kept() -> None:
    chosen = plan(LLAMA_8B, 139, batch_size=8, checkpointing=True)
    assert (chosen.batch_size, chosen.gradient_checkpointing) == (8, True)
    chosen = plan(LLAMA_8B, 139, batch_size=1)
    assert (chosen.batch_size, chosen.gradient_checkpointing) == (1, False)


def test_too_little_memory_still_returns_the_smallest_plan() -> None:
    chosen = plan(LLAMA_8B, 10)
    assert (chosen.batch_size, chosen.gradient_checkpointing) == (1, True)
    assert "gradient checkpointing on" in chosen.describe()


def test_shape_from_config_defaults() -> None:
    class Config:
        hidden_size, intermediate_size, num_hidden_layers = 64, 128, 2
        vocab_size, num_attention_heads = 100, 4

    shape = memory.Shape.from_config(Config())
    assert (shape.num_key_value_heads, shape.head_dim) == (4, 16)


def test_host_memory_is_positive() -> None:
    assert memory.host_available_bytes() > 0


BAD_OPTIONS = [
    ({"name": "Bad Name"}, "--name"),
    ({"name": "../x"}, "--name"),
    ({"r": 0}, "--r"),
    ({"lr": -1.0}, "--lr"),
    ({"batch_size": 0}, "--batch-size"),
    ({"dropout": 1.0}, "--dropout"),
    ({"warmup_ratio": 1.0}, "--warmup-ratio"),
    ({"target_modules": ()}, "--target-modules"),
    ({"max_steps": 0}, "--max-steps"),
]


@pytest.mark.parametrize(("changes", "flag"), BAD_OPTIONS)
def test_bad_options_name_the_flag(changes: dict, flag: str) -> None:
    opts = TrainOptions(**{"data": Path("d.jsonl"), "name": "ok", **changes})
    with pytest.raises(InvalidRequest, match=f"^{flag} "):
        opts.check()


def test_every_flag_an_error_names_is_a_flag_of_train() -> None:
    import typer
    from typer.main import get_command

    from loraplex.train.cli import train_command

    app = typer.Typer()
    app.command()(train_command)
    flags = {opt for param in get_command(app).params for opt in param.opts}
    assert {flag for _, flag in BAD_OPTIONS} <= flags


def test_defaults_are_rank_16_on_every_projection() -> None:
    opts = TrainOptions(data=Path("d.jsonl"), name="ok")
    opts.check()
    hp = opts.hyperparameters()
    assert (hp["r"], hp["alpha"], hp["dropout"], hp["lr"]) == (16, 32, 0.05, 2e-4)
    assert hp["target_modules"] == list(LINEAR_PROJECTIONS)
    assert (hp["grad_accum"], hp["epochs"], hp["prompt_format"]) == (None, None, "auto")
