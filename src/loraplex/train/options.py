"""The options of one training run (``TrainOptions``) and their defaults.

Defaults: rank 16, alpha 32, dropout 0.05, every attention and MLP projection, learning rate
2e-4 with 3% warmup, gradient accumulation 4, 3 epochs. ``batch_size`` and
``gradient_checkpointing`` left as ``None`` are chosen from the memory the device has
(``loraplex.train.memory``). This module holds plain data; it imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from loraplex.adapters import LINEAR_PROJECTIONS, NAME_RE
from loraplex.errors import InvalidRequest

DEFAULT_TARGET_MODULES = LINEAR_PROJECTIONS


@dataclass
class TrainOptions:
    """Everything one run needs; ``hyperparameters()`` is what the manifest records."""

    data: Path
    name: str
    base: Path | None = None
    eval_data: Path | None = None
    output: Path | None = None
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    epochs: float = 3.0
    max_steps: int | None = None
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    batch_size: int | None = None
    grad_accum: int = 4
    max_seq_len: int = 2048
    seed: int = 0
    save_steps: int = 50
    gradient_checkpointing: bool | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resume: bool = False
    force: bool = False
    show_progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # more TrainingArguments (benchmarks)
    callbacks: list[Any] = field(default_factory=list)  # more TrainerCallbacks (benchmarks)

    def check(self) -> None:
        """Raise ``InvalidRequest`` naming the first option that cannot work."""
        if not NAME_RE.fullmatch(self.name):
            raise InvalidRequest(
                f"--name '{self.name}': use 1-64 characters a-z, 0-9, '_' or '-', "
                "starting with a letter or digit."
            )
        positive = {
            "--r": self.r,
            "--alpha": self.alpha,
            "--lr": self.lr,
            "--grad-accum": self.grad_accum,
            "--max-seq-len": self.max_seq_len,
            "--save-steps": self.save_steps,
            "--epochs": self.epochs,
        }
        if self.batch_size is not None:
            positive["--batch-size"] = self.batch_size
        if self.max_steps is not None:
            positive["--max-steps"] = self.max_steps
        for flag, value in positive.items():
            if value <= 0:
                raise InvalidRequest(f"{flag} must be greater than 0 (got {value}).")
        if not 0 <= self.dropout < 1:
            raise InvalidRequest(f"--dropout must be in [0, 1) (got {self.dropout}).")
        if not 0 <= self.warmup_ratio < 1:
            raise InvalidRequest(f"--warmup-ratio must be in [0, 1) (got {self.warmup_ratio}).")
        if not self.target_modules:
            raise InvalidRequest("--target-modules is empty; name at least one module.")

    def hyperparameters(self) -> dict[str, Any]:
        """The settings that shape the adapter (recorded in the manifest, checked on resume)."""
        keys = (
            "r",
            "alpha",
            "dropout",
            "target_modules",
            "epochs",
            "max_steps",
            "lr",
            "warmup_ratio",
            "grad_accum",
            "max_seq_len",
            "seed",
        )
        values = asdict(self)
        out = {key: values[key] for key in keys}
        out["target_modules"] = list(self.target_modules)
        return out
