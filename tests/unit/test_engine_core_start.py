"""``fork_runs_parallel_ops``: the check that decides between forking and spawning the engine."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import torch
from loraplex.engine.engine_core_start import fork_runs_parallel_ops
torch.set_num_threads(2)
print(fork_runs_parallel_ops())
torch.ones(1 << 20).mul_(2)  # starts OpenMP's thread pool in this process
print(fork_runs_parallel_ops(timeout=3))
"""


def test_a_fork_is_refused_once_openmp_threads_run() -> None:
    """In a fresh process a fork works; after one parallel op its child would hang."""
    pytest.importorskip("torch")
    result = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False"]
