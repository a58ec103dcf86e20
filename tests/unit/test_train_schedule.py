"""The auto schedule: batch, accumulation, epochs and warmup from the dataset size."""

from __future__ import annotations

import pytest

from loraplex.train.schedule import (
    MAX_EFFECTIVE_BATCH,
    MAX_EPOCHS,
    MAX_EXAMPLES_SEEN,
    MIN_STEPS,
    auto_effective_batch,
    auto_epochs,
    choose,
)


@pytest.mark.parametrize(
    ("examples", "batch"),
    [(1, 1), (3, 3), (60, 4), (799, 4), (800, 8), (1600, 16), (3200, 32), (10**6, 32)],
)
def test_effective_batch_grows_with_data_within_bounds(examples: int, batch: int) -> None:
    assert auto_effective_batch(examples) == batch


def test_sixty_rows_get_at_least_a_hundred_steps() -> None:
    sched = choose(60, device_batch=8)
    assert (sched.batch_size, sched.grad_accum, sched.epochs) == (4, 1, 7.0)
    assert sched.steps == 105 >= MIN_STEPS
    assert sched.warmup_steps == 4  # ceil(0.03 * 105): steps, not a ratio
    assert sched.auto == ("batch_size", "grad_accum", "epochs")


@pytest.mark.parametrize("examples", [1, 5, 20, 60, 150, 400, 1000, 5000, 9000, 50_000, 10**6])
def test_small_data_gets_enough_steps_and_large_data_is_not_over_trained(examples: int) -> None:
    sched = choose(examples, device_batch=8)
    assert 1 <= sched.epochs <= MAX_EPOCHS
    if sched.epochs < MAX_EPOCHS:
        assert sched.steps >= MIN_STEPS
    if examples * 3 > MAX_EXAMPLES_SEEN:
        assert examples * sched.epochs <= max(MAX_EXAMPLES_SEEN, examples)
    assert sched.effective_batch <= MAX_EFFECTIVE_BATCH


def test_default_three_epochs_in_between() -> None:
    assert auto_epochs(1000, 8) == 3.0


def test_accumulation_makes_up_what_memory_cannot_hold() -> None:
    sched = choose(5000, device_batch=8)
    assert (sched.batch_size, sched.grad_accum) == (8, 4)


def test_given_values_are_kept_and_the_rest_chosen_around_them() -> None:
    both = choose(60, device_batch=8, batch_size=4, grad_accum=1, epochs=8)
    assert (both.steps, both.auto) == (120, ())
    accum_only = choose(5000, device_batch=8, grad_accum=8)
    assert (accum_only.batch_size, accum_only.grad_accum) == (8, 8)  # batch: from memory
    batch_only = choose(5000, device_batch=8, batch_size=2)
    assert (batch_only.batch_size, batch_only.grad_accum) == (2, 16)
    capped = choose(60, device_batch=8, max_steps=10)
    assert capped.steps == 10 and "epochs" not in capped.auto


def test_record_and_description_say_what_was_chosen() -> None:
    sched = choose(60, device_batch=8)
    assert sched.record()["auto"] == ["batch_size", "grad_accum", "epochs"]
    assert sched.record()["warmup_steps"] == 4
    assert "105 optimizer steps" in sched.describe() and "auto:" in sched.describe()


def test_no_examples_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        choose(0, device_batch=8)
