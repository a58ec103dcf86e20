"""Trainer callbacks: a progress bar with loss and ETA, and Ctrl-C that saves a checkpoint.

``ProgressCallback`` draws a rich bar on a terminal and prints one line per logging step
elsewhere (CI logs). ``InterruptCallback`` turns the first Ctrl-C (SIGINT) into "save a
checkpoint now and stop" at the end of the current optimizer step; a second Ctrl-C stops at
once. Neither callback changes what is trained.
"""

from __future__ import annotations

import signal
import sys
import time
from types import FrameType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import TrainerCallback


class ProgressCallback(TrainerCallback):
    """Shows optimizer steps done, the latest loss and the time left."""

    def __init__(self, label: str, enabled: bool = True) -> None:
        self.label = label
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.progress: Progress | None = None
        self.task: Any = None
        self.loss = "-"
        self.started = 0.0
        self.start_epoch = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start_epoch = float(getattr(state, "epoch", 0.0) or 0.0)
        if not self.enabled:
            return
        self.started = time.monotonic()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.console.is_terminal,
        )
        self.task = self.progress.add_task(
            self.label, total=state.max_steps, completed=state.global_step, loss=self.loss
        )
        self.progress.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, loss=self.loss)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if not self.enabled or not logs:
            return
        if "loss" in logs:
            self.loss = f"{logs['loss']:.4f}"
        if self.progress is not None:
            self.progress.update(self.task, loss=self.loss)
        if not self.console.is_terminal and ("loss" in logs or "eval_loss" in logs):
            self._plain_line(state, logs)

    def _plain_line(self, state: Any, logs: dict[str, float]) -> None:
        figures = [f"{k} {v:.4f}" for k, v in logs.items() if k in ("loss", "eval_loss")]
        if not self.started:
            print(
                f"{self.label} before training: {'  '.join(figures)}", file=sys.stderr, flush=True
            )
            return
        done, total = state.global_step, max(state.max_steps, 1)
        elapsed = time.monotonic() - self.started
        eta = elapsed / max(done, 1) * (total - done)
        parts = [f"{self.label} step {done}/{total}", *figures, f"ETA {eta:.0f}s"]
        print("  ".join(parts), file=sys.stderr, flush=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, loss=self.loss)
            self.progress.stop()
            self.progress = None


class InterruptCallback(TrainerCallback):
    """First Ctrl-C: checkpoint at the end of this step and stop; second: stop now."""

    def __init__(self) -> None:
        self.interrupted = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        print(
            "\nCtrl-C: saving a checkpoint after this step, then stopping "
            "(press Ctrl-C again to stop at once, without it).",
            file=sys.stderr,
            flush=True,
        )

    def install(self) -> None:
        """Take over SIGINT (main thread only; elsewhere Ctrl-C keeps its default)."""
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:
            self._previous = None

    def restore(self) -> None:
        """Give SIGINT back to whoever had it."""
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True
