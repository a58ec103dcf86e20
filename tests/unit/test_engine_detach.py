"""vLLM's engine processes leave the server's process group and die with their parent."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import sys

import pytest

from loraplex.engine.detach import detach_engine_process

PR_GET_PDEATHSIG = 2

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def report(queue: multiprocessing.Queue) -> None:
    detach_engine_process()
    signal = ctypes.c_int()
    ctypes.CDLL(None).prctl(PR_GET_PDEATHSIG, ctypes.byref(signal), 0, 0, 0)
    queue.put((os.getpgid(0) == os.getpid(), signal.value))


@pytest.mark.parametrize(("name", "own_group"), [("EngineCore", True), ("VllmWorker-0", False)])
def test_engine_processes_detach(name: str, own_group: bool) -> None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=report, args=(queue,), name=name)
    child.start()
    assert queue.get(timeout=60) == (own_group, 9)  # SIGKILL when the parent dies
    child.join(60)


def test_the_server_process_stays_as_it_is() -> None:
    group = os.getpgid(0)
    detach_engine_process()
    assert os.getpgid(0) == group
