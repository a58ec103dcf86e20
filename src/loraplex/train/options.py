"""The options of one training run (``TrainOptions``) and their defaults.

Defaults: rank 16, alpha 32, dropout 0.05, every attention and MLP projection, learning rate
2e-4 with 3% warmup. ``batch_size``, ``grad_accum`` and ``epochs`` left as ``None`` are chosen
from the dataset size and the device's memory (``loraplex.train.schedule``,
``loraplex.train.memory``), as is ``gradient_checkpointing``. ``prompt_format`` "auto" trains
chat whenever the base model has a chat template (``{"input", "output"}`` rows become one user
turn and one assistant turn), completion otherwise. This module holds plain data; it imports
nothing heavy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from loraplex.adapters import LINEAR_PROJECTIONS, NAME_RE
from loraplex.errors import InvalidRequest

DEFAULT_TARGET_MODULES = LINEAR_PROJECTIONS
PROMPT_FORMATS = ("auto", "chat", "completion")


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
    epochs: float | None = None
    max_steps: int | None = None
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    batch_size: int | None = None
    grad_accum: int | None = None
    max_seq_len: int = 2048
    seed: int = 0
    save_steps: int = 50
    gradient_checkpointing: bool | None = None
    packing: bool | None = None  # None: auto (loraplex.train.packing.should_pack)
    fused_kernels: bool | None = None  # None: on where Liger Kernel is available
    torch_compile: bool | None = None  # None: on CUDA (loraplex.train.compiling)
    # packed rows; auto: loraplex.train.packing.packed_attention (others for benchmarks)
    packed_attention: Literal["auto", "flex", "sdpa", "varlen"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    prompt_format: Literal["auto", "chat", "completion"] = "auto"
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
            "--max-seq-len": self.max_seq_len,
            "--save-steps": self.save_steps,
        }
        optional = {
            "--batch-size": self.batch_size,
            "--grad-accum": self.grad_accum,
            "--epochs": self.epochs,
            "--max-steps": self.max_steps,
        }
        positive.update({flag: value for flag, value in optional.items() if value is not None})
        for flag, value in positive.items():
            if value <= 0:
                raise InvalidRequest(f"{flag} must be greater than 0 (got {value}).")
        if not 0 <= self.dropout < 1:
            raise InvalidRequest(f"--dropout must be in [0, 1) (got {self.dropout}).")
        if not 0 <= self.warmup_ratio < 1:
            raise InvalidRequest(f"--warmup-ratio must be in [0, 1) (got {self.warmup_ratio}).")
        if self.prompt_format not in PROMPT_FORMATS:
            raise InvalidRequest(
                f"--format {self.prompt_format}: use one of {', '.join(PROMPT_FORMATS)}."
            )
        if not self.target_modules:
            raise InvalidRequest("--target-modules is empty; name at least one module.")

    def hyperparameters(self) -> dict[str, Any]:
        """The settings as given (``None``: auto), checked on resume; the manifest adds the
        chosen schedule."""
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
            "prompt_format",
        )
        values = asdict(self)
        out = {key: values[key] for key in keys}
        out["target_modules"] = list(self.target_modules)
        return out
