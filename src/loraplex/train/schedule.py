"""The training schedule: batch, accumulation, epochs, optimizer steps and warmup ("auto").

Hosted fine-tuning services pick these from the dataset size when the user does not; so does
``choose``, with one rule (OpenAI's epoch rule, plus a step floor for tiny data):

- effective batch (sequences per optimizer step) = ``n / 100`` rounded down to a power of
  two, within [4, 32] (never more than ``n``): about 100 steps per epoch until the batch
  reaches 32, so small data is not averaged into a handful of steps;
- epochs = 3; but at least enough for ``MIN_STEPS`` (100) optimizer steps, up to 25 epochs
  (small data), and at most ``MAX_EXAMPLES_SEEN // n`` epochs (25,000 examples seen), at
  least 1 (large data is not over-trained);
- the per-pass batch is the memory plan's largest batch, capped at the effective batch
  unless ``--grad-accum`` is given; accumulation makes up the rest;
- warmup steps = ``ceil(warmup_ratio * steps)`` (an integer number of steps).

Any value given on the command line is kept and the others are chosen around it. Pure
arithmetic: no torch, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_EFFECTIVE_BATCH, MAX_EFFECTIVE_BATCH = 4, 32
EXAMPLES_PER_STEP_DIVISOR = 100  # effective batch ~ n / 100 -> ~100 steps per epoch
DEFAULT_EPOCHS = 3
MIN_STEPS = 100
MAX_EPOCHS = 25
MAX_EXAMPLES_SEEN = 25_000


@dataclass(frozen=True)
class Schedule:
    """What one run does; ``auto`` names the values chosen rather than given."""

    examples: int
    batch_size: int
    grad_accum: int
    epochs: float
    steps: int
    warmup_steps: int
    auto: tuple[str, ...]

    @property
    def effective_batch(self) -> int:
        """Sequences per optimizer step."""
        return self.batch_size * self.grad_accum

    def describe(self) -> str:
        """One line for the log: the numbers, and which were chosen automatically."""
        chosen = f" (auto: {', '.join(self.auto)})" if self.auto else ""
        return (
            f"batch {self.batch_size} x accumulation {self.grad_accum} = {self.effective_batch} "
            f"per step, {self.epochs:g} epochs, {self.steps} optimizer steps, "
            f"{self.warmup_steps} warmup steps{chosen}"
        )

    def record(self) -> dict[str, object]:
        """The manifest's view of the schedule."""
        return {
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "effective_batch": self.effective_batch,
            "epochs": self.epochs,
            "steps": self.steps,
            "warmup_steps": self.warmup_steps,
            "auto": list(self.auto),
        }


def _pow2_floor(value: float) -> int:
    return 1 << max(int(math.floor(math.log2(value))), 0) if value >= 1 else 1


def auto_effective_batch(examples: int) -> int:
    """Sequences per optimizer step for ``examples`` rows (see the module docstring)."""
    batch = _pow2_floor(examples / EXAMPLES_PER_STEP_DIVISOR)
    batch = min(max(batch, MIN_EFFECTIVE_BATCH), MAX_EFFECTIVE_BATCH)
    return max(min(batch, examples), 1)


def auto_epochs(examples: int, effective_batch: int) -> float:
    """Passes over the data: 3, raised to reach ``MIN_STEPS``, lowered for large data."""
    per_epoch = math.ceil(examples / effective_batch)
    if per_epoch * DEFAULT_EPOCHS < MIN_STEPS:
        return float(min(MAX_EPOCHS, math.ceil(MIN_STEPS / per_epoch)))
    if examples * DEFAULT_EPOCHS > MAX_EXAMPLES_SEEN:
        return float(max(1, MAX_EXAMPLES_SEEN // examples))
    return float(DEFAULT_EPOCHS)


def choose(
    examples: int,
    *,
    device_batch: int,
    batch_size: int | None = None,
    grad_accum: int | None = None,
    epochs: float | None = None,
    max_steps: int | None = None,
    warmup_ratio: float = 0.03,
) -> Schedule:
    """The schedule for ``examples`` rows; given values are kept, ``None`` ones chosen.

    ``device_batch`` is the largest per-pass batch the memory plan allows.
    """
    if examples < 1:
        raise ValueError("a schedule needs at least one example")
    auto = []
    target = auto_effective_batch(examples)
    if batch_size is None:
        auto.append("batch_size")
        per_pass = target if grad_accum is None else device_batch
        batch_size = max(min(device_batch, per_pass), 1)
    if grad_accum is None:
        auto.append("grad_accum")
        grad_accum = max(target // batch_size, 1)
    per_epoch = math.ceil(examples / (batch_size * grad_accum))
    if max_steps is not None:
        steps = max_steps
        epochs = epochs if epochs is not None else steps / per_epoch
    else:
        if epochs is None:
            auto.append("epochs")
            epochs = auto_epochs(examples, batch_size * grad_accum)
        steps = max(math.ceil(per_epoch * epochs), 1)
    warmup = math.ceil(warmup_ratio * steps)
    return Schedule(examples, batch_size, grad_accum, float(epochs), steps, warmup, tuple(auto))
