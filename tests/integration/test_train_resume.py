"""Ctrl-C during ``loraplex train`` leaves a usable checkpoint, and ``--resume`` from it
ends with the same adapter as an uninterrupted run with the same seed (real model, CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraplex.train.demo import demo_data

pytestmark = pytest.mark.integration

STEPS = 8


def command(base: Path, out: Path, *extra: str) -> list[str]:
    data, _ = demo_data("pirate")
    return [sys.executable, "-m", "loraplex.cli", "train", "--data", str(data),
            "--name", "resumed", "--output", str(out), "--base", str(base),
            "--max-steps", str(STEPS), "--save-steps", "2", "--batch-size", "2",
            "--grad-accum", "1", "--lr", "1e-3", "--seed", "7", *extra]  # fmt: skip


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


def test_interrupt_then_resume_equals_uninterrupted(tmp_path: Path, base_model_dir: Path) -> None:
    env = {**os.environ, "LORAPLEX_HOME": str(tmp_path / "home")}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"

    done = run(command(base_model_dir, straight), env)
    assert done.returncode == 0, done.stderr[-3000:]

    first = tmp_path / "first.log"
    with first.open("w") as log:
        proc = subprocess.Popen(command(base_model_dir, resumed), env=env, stderr=log, text=True)
        marker = resumed / ".checkpoints" / "checkpoint-2" / "trainer_state.json"
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=300)
    stderr = first.read_text()
    assert code == 130, stderr[-3000:]
    assert "--resume" in stderr
    checkpoints = sorted((resumed / ".checkpoints").glob("checkpoint-*"))
    assert checkpoints, "Ctrl-C left no checkpoint"
    stopped_at = max(int(p.name.split("-")[1]) for p in checkpoints)
    assert 2 <= stopped_at < STEPS
    assert (checkpoints[-1] / "adapter_model.safetensors").is_file()
    assert not (resumed / "loraplex.json").exists()

    changed = run(command(base_model_dir, resumed, "--resume", "--lr", "2e-3"), env)
    assert changed.returncode != 0 and "differs" in changed.stderr

    done = run(command(base_model_dir, resumed, "--resume"), env)
    assert done.returncode == 0, done.stderr[-3000:]

    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    ra = json.loads((straight / "loraplex.json").read_text())["results"]
    rb = json.loads((resumed / "loraplex.json").read_text())["results"]
    assert rb["steps"] == ra["steps"] == STEPS
    assert rb["final_train_loss"] == pytest.approx(ra["final_train_loss"], rel=1e-4)
    assert not (resumed / ".checkpoints").exists()
